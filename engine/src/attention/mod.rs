//! Attention over a KV cache the op keeps itself ([`KvAttention`]), put in place of tract's
//! `InPlaceKvSdpa` when a model is loaded.
//!
//! Why: tract's flash attention computes one query the way it computes a block of 32, through
//! `matrixmultiply`, which packs every 32-key block of K and V for each head before a 1-row
//! product; with its allocations that was a quarter of a decode step (2.0 ms of 9.4 at one
//! thread, `fieldllmd bench --profile`). One query needs only dot products over the cache, and
//! its heads split over the same team as the matrix products. A prompt chunk's queries take the
//! same path, each seeing the keys up to its position, the (head, query) pairs split over the
//! team: tract's flash kernel ran a prefill's attention on one thread while the others waited,
//! 20% of a 128-token prefill (SmolLM2 Q4_0, 2 threads, `fieldllmd bench --profile`).
//!
//! The cache is position-major, `[position, kv head, head dim]`: appending a token is a copy to
//! the end and forgetting the tail of a conversation ([`KvAttentionState::truncate`]) is a
//! length change, where tract's cache op could not be truncated at all.

use std::sync::{Arc, Mutex};

use tract_core::internal::*;
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;
use tract_transformers::ops::inplace_kv_cache::InPlaceKvSdpa;

use crate::cpu::{Isa, Team, part_of};
use kernel::Rows;

mod kernel;

/// Scaled dot-product attention of `Q [1, heads, queries, d]` over the cache extended with
/// `K_new`, `V_new` (`[1, kv heads, queries, d]`), optionally with an additive mask
/// (`[1, 1 | heads, queries, cache length]`); grouped-query heads share their kv head.
#[derive(Clone, Debug)]
pub struct KvAttention {
    /// The state name of the cache (as tract's cache ops name it).
    pub name: String,
    /// The cache's fact `[1, kv heads, past, d]`, whose symbol the graph reads the past length
    /// from.
    pub past_sequence_fact: TypedFact,
    /// Queries see only keys at or before their position (ignored when a mask is given).
    pub causal: bool,
    /// Score scale (default `1 / sqrt(d)`).
    pub scale: Option<f32>,
    /// Threads that split the heads of one query; set after loading.
    pub team: Option<Arc<Team>>,
}

impl PartialEq for KvAttention {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.name,
            &self.past_sequence_fact,
            self.causal,
            self.scale,
        ) == (
            &other.name,
            &other.past_sequence_fact,
            other.causal,
            other.scale,
        )
    }
}

impl Eq for KvAttention {}

impl Op for KvAttention {
    fn name(&self) -> StaticName {
        "KvAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "causal={}, scale={:?}, threads={}",
            self.causal,
            self.scale,
            self.team.as_ref().map_or(1, |t| t.threads())
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for KvAttention {
    not_out_of_plan!();

    fn state(&self, _ctx: &EvalContext<'_>) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(KvAttentionState {
            name: self.name.clone(),
            past_sequence_fact: self.past_sequence_fact.clone(),
            k: Vec::new(),
            v: Vec::new(),
            len: 0,
            kv_heads: 0,
            d: 0,
        })))
    }
}

impl TypedOp for KvAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            matches!(inputs.len(), 3 | 4),
            "KvAttention takes Q, K, V and an optional mask"
        );
        ensure!(
            inputs[..3].iter().all(|f| f.rank() == 4),
            "KvAttention takes rank-4 Q, K, V"
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// The cache of one [`KvAttention`] node.
#[derive(Clone, Debug)]
pub struct KvAttentionState {
    name: String,
    past_sequence_fact: TypedFact,
    /// `[len, kv heads, d]`
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    kv_heads: usize,
    d: usize,
}

/// Positions a KV cache grows by when it is full.
pub const GROW_POSITIONS: usize = 256;

impl KvAttentionState {
    /// Positions in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the first `len` positions (no-op if there are fewer).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            let row = self.kv_heads * self.d;
            self.k.truncate(len * row);
            self.v.truncate(len * row);
            self.len = len;
        }
    }

    /// Appends `[1, kv heads, s, d]` to the position-major `cache`, which grows with use in
    /// steps of [`GROW_POSITIONS`] (not doubling: a long answer's cache would otherwise hold up
    /// to twice what it uses).
    fn append(cache: &mut Vec<f32>, new: &[f32], kv_heads: usize, s: usize, d: usize) {
        let want = cache.len() + new.len();
        if want > cache.capacity() {
            let step = GROW_POSITIONS * kv_heads * d;
            cache.reserve_exact(want.div_ceil(step) * step - cache.len());
        }
        for pos in 0..s {
            for g in 0..kv_heads {
                let at = (g * s + pos) * d;
                cache.extend_from_slice(&new[at..at + d]);
            }
        }
    }
}

impl OpState for KvAttentionState {
    // The graph reads the past length (the positions of the new tokens) from the symbol of
    // the cache's fact: resolved from this cache, as tract's cache ops do.
    fn init_tensor_fact(&self) -> Option<(String, TypedFact)> {
        Some((self.name.clone(), self.past_sequence_fact.clone()))
    }

    fn has_init_tensor_fact(&self) -> bool {
        true
    }

    fn resolve_symbols(&mut self, state: &mut TurnState) -> TractResult<()> {
        let shape = [1, self.kv_heads, self.len, self.d];
        DynKeyValueCacheState::resolve_symbols(
            state,
            self.past_sequence_fact.clone(),
            (self.len > 0).then_some(&shape[..]),
        )
    }

    fn eval(
        &mut self,
        _ctx: &EvalContext<'_>,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<KvAttention>()
            .context("KvAttentionState run by another op")?;
        op.eval_with(self, inputs)
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("KvAttention keeps one stream's cache, it has no lanes")
    }
}

impl KvAttention {
    fn eval_with(
        &self,
        st: &mut KvAttentionState,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        ensure!(
            matches!(inputs.len(), 3 | 4),
            "KvAttention takes Q, K, V and an optional mask"
        );
        let dt = inputs[0].datum_type();
        let q = inputs[0].cast_to::<f32>()?;
        let k_new = inputs[1].cast_to::<f32>()?;
        let v_new = inputs[2].cast_to::<f32>()?;
        let (qs, ks) = (q.shape(), k_new.shape());
        ensure!(
            qs.len() == 4 && qs[0] == 1 && ks.len() == 4 && ks == v_new.shape(),
            "KvAttention takes Q [1, heads, s, d], K and V [1, kv heads, s, d]: got {qs:?}, \
             {ks:?}, {:?}",
            v_new.shape()
        );
        let (heads, s, d, kv_heads) = (qs[1], qs[2], qs[3], ks[1]);
        ensure!(
            ks[0] == 1
                && ks[2] == s
                && ks[3] == d
                && d > 0
                && kv_heads > 0
                && heads % kv_heads == 0,
            "K {ks:?} does not fit Q {qs:?}"
        );
        ensure!(
            st.len == 0 || (st.kv_heads, st.d) == (kv_heads, d),
            "K/V shape changed within a conversation"
        );
        (st.kv_heads, st.d) = (kv_heads, d);
        // everything is checked before the cache grows: a bad input leaves it as it was
        let len = st.len + s;
        let mask = match inputs.get(3) {
            Some(m) => {
                let m = m.cast_to::<f32>()?.into_owned();
                let ms = m.shape();
                ensure!(
                    ms.len() == 4
                        && ms[0] == 1
                        && (ms[1] == 1 || ms[1] == heads)
                        && ms[2] == s
                        && ms[3] == len,
                    "mask {ms:?} does not fit [1, 1 | {heads}, {s}, {len}]"
                );
                Some(m)
            }
            None => None,
        };
        KvAttentionState::append(&mut st.k, floats(&k_new)?, kv_heads, s, d);
        KvAttentionState::append(&mut st.v, floats(&v_new)?, kv_heads, s, d);
        st.len = len;
        let scale = self.scale.unwrap_or(1.0 / (d as f32).sqrt());

        let mut out = vec![0f32; heads * s * d];
        self.queries(st, floats(&q)?, s, mask.as_ref(), scale, &mut out)?;
        let out = Tensor::from_shape(&[1, heads, s, d], &out)?;
        let out = if dt == f32::datum_type() {
            out
        } else {
            out.cast_to_dt(dt)?.into_owned()
        };
        Ok(tvec!(out.into_tvalue()))
    }

    /// `s` queries (the last `s` positions of the cache), every head: the (head, query) pairs
    /// split over the team in equal runs. A causal query sees the keys up to its own position,
    /// a masked one every key plus its mask row.
    fn queries(
        &self,
        st: &KvAttentionState,
        q: &[f32],
        s: usize,
        mask: Option<&Tensor>,
        scale: f32,
        out: &mut [f32],
    ) -> TractResult<()> {
        let (len, kv_heads, d) = (st.len, st.kv_heads, st.d);
        let heads = q.len() / (s * d);
        let group = heads / kv_heads;
        let mask = match mask {
            Some(m) => Some((floats(m)?, m.shape()[1] == heads)),
            None => None,
        };
        let pairs = heads * s;
        let threads = self.team.as_ref().map_or(1, |t| t.threads()).min(pairs);
        let isa = Isa::best();
        // each part takes its own contiguous run of `out`; the mutexes are never contended
        let mut rest = &mut out[..];
        let mut parts = Vec::with_capacity(threads);
        for p in 0..threads {
            let r = part_of(pairs, threads, 1, p);
            let (mine, tail) = rest.split_at_mut(r.len() * d);
            parts.push(Mutex::new((r, mine)));
            rest = tail;
        }
        let job = |p: usize| {
            let Some(part) = parts.get(p) else { return };
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            let (range, out) = &mut *part;
            let mut scores = vec![0f32; len];
            for (pair, o) in range.clone().zip(out.chunks_exact_mut(d)) {
                let (h, i) = (pair / s, pair % s);
                let rows = |m| Rows {
                    m,
                    stride: kv_heads * d,
                    off: h / group * d,
                    d,
                };
                let (seen, mrow) = match mask {
                    Some((m, per_head)) => {
                        let mh = if per_head { h } else { 0 };
                        (len, Some(&m[(mh * s + i) * len..][..len]))
                    }
                    None if self.causal => (len - s + i + 1, None),
                    None => (len, None),
                };
                attend(
                    isa,
                    &q[pair * d..][..d],
                    (rows(&st.k), rows(&st.v)),
                    scale,
                    mrow,
                    &mut scores[..seen],
                    o,
                );
            }
        };
        match &self.team {
            Some(team) if threads > 1 => team.run(&job),
            _ => job(0),
        }
        Ok(())
    }
}

/// `o = softmax(scale * K_g q + mask) V_g` for one head over the whole cache.
fn attend(
    isa: Isa,
    q: &[f32],
    (k, v): (Rows<'_>, Rows<'_>),
    scale: f32,
    mask: Option<&[f32]>,
    scores: &mut [f32],
    o: &mut [f32],
) {
    kernel::dots(isa, q, k, scores);
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = *s * scale + mask.map_or(0.0, |m| m[j]);
        max = max.max(*s);
    }
    if max == f32::NEG_INFINITY {
        o.fill(0.0);
        return; // every key masked: nothing to attend to
    }
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
    }
    let inv = 1.0 / sum8(scores);
    for s in scores.iter_mut() {
        *s *= inv;
    }
    kernel::weighted_sum(isa, scores, v, o);
}

/// Sum with eight partial sums (vectorizes, where one running sum cannot).
#[inline(always)]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for c in c {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The values of an f32 tensor.
fn floats(t: &Tensor) -> TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// Puts a [`KvAttention`] in place of every tract `InPlaceKvSdpa` of an optimized model (same
/// inputs, same output), sharing `team`.
pub fn install(model: &mut TypedModel, team: Option<&Arc<Team>>) {
    for node in &mut model.nodes {
        let Some(op) = node.op_as::<InPlaceKvSdpa>() else {
            continue;
        };
        if op.axis != 2 {
            continue; // a layout this op does not keep
        }
        let ours = KvAttention {
            name: op.name.clone(),
            past_sequence_fact: op.past_sequence_fact.clone(),
            causal: op.causal,
            scale: op.scale,
            team: team.cloned(),
        };
        node.op = Box::new(ours);
    }
}

#[cfg(test)]
mod tests;
