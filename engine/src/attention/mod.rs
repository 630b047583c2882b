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
//! The cache keeps each kv head's keys (and values) apart, `[position, head dim]`: appending a
//! token is a copy to the end of each and forgetting the tail of a conversation
//! ([`KvAttentionState::truncate`]) is a length change, where tract's cache op could not be
//! truncated at all. A head's attention then reads one contiguous run of memory: with the
//! heads interleaved by position (`[position, kv head, head dim]`, as before) each read skipped
//! the other heads' rows, and a 4-answer decode step's attention took 25-30% longer (one
//! thread, SmolLM2's shape, `cargo test --release -p fieldllm-engine --lib attend_speed --
//! --ignored`); decoding several answers together spends a quarter of a step there.
//!
//! One state keeps a cache per conversation (a *slot*). In a model whose rows are open
//! ([`crate::rows`]) the op takes two more inputs, each row's position and slot, so one run
//! carries the rows of several conversations (a decode step of every running answer, a chunk of
//! a new prompt beside them): each row's key and value go to its slot's cache and its query
//! sees that cache up to its own position. Without them every row is slot 0's, after its cache.

use std::sync::{Arc, Mutex};

use tract_core::internal::*;
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;
use tract_transformers::ops::inplace_kv_cache::InPlaceKvSdpa;

use crate::cpu::{Isa, Team, part_of};
pub use kernel::KvCache;
use kernel::{Elem, Rows};

#[cfg(target_arch = "x86_64")]
mod avx512;
mod kernel;

/// Scaled dot-product attention of `Q [1, heads, queries, d]` over the cache extended with
/// `K_new`, `V_new` (`[1, kv heads, queries, d]`), optionally with an additive mask
/// (`[1, 1 | heads, queries, cache length]`), or with each query's position and slot (`[queries]`
/// i64 each, see the module's notes); grouped-query heads share their kv head.
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
    /// Inputs 4 and 5 are each row's position and slot (no mask).
    pub rows: bool,
    /// What the caches keep keys and values as.
    pub kv: KvCache,
}

impl PartialEq for KvAttention {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.name,
            &self.past_sequence_fact,
            self.causal,
            self.scale,
            self.rows,
            self.kv,
        ) == (
            &other.name,
            &other.past_sequence_fact,
            other.causal,
            other.scale,
            other.rows,
            other.kv,
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
            "causal={}, scale={:?}, rows={}, kv={}, threads={}",
            self.causal,
            self.scale,
            self.rows,
            self.kv.name(),
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
            caches: match self.kv {
                KvCache::F16 => Caches::F16(vec![Cache::default()]),
                KvCache::F32 => Caches::F32(vec![Cache::default()]),
            },
            kv_heads: 0,
            d: 0,
        })))
    }
}

impl TypedOp for KvAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.check_arity(inputs.len())?;
        ensure!(
            inputs[..3].iter().all(|f| f.rank() == 4),
            "KvAttention takes rank-4 Q, K, V"
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// The caches of one [`KvAttention`] node, one per slot (conversation).
#[derive(Clone, Debug)]
pub struct KvAttentionState {
    name: String,
    past_sequence_fact: TypedFact,
    /// Per slot; slot 0 always exists.
    caches: Caches,
    kv_heads: usize,
    d: usize,
}

/// One conversation's keys and values: `[kv heads, cap, d]` each, head `g`'s first `len`
/// positions at `g * cap * d`. One allocation each (not one per head): a cache's memory comes
/// from and goes back to the system whole, where small per-head buffers stayed in the heap
/// after their answers ended (+60 MB resident after 4 answers of SmolLM2).
///
/// `T`: half-precision floats' bits ([`kernel::narrow`], [`KvCache::F16`], the default, as
/// llama.cpp's) or f32. A decode step reads every position's key and value of every running
/// answer from memory (the step's weights evict them from the caches between layers), so
/// half the bytes is most of the time attention takes once several answers decode together;
/// and a slot holds twice the positions in the same memory. Halves round keys and values to 11
/// significant bits; the scores, softmax and sums stay f32 either way.
#[derive(Clone, Debug)]
struct Cache<T> {
    k: Vec<T>,
    v: Vec<T>,
    len: usize,
    /// Positions each head has room for.
    cap: usize,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache {
            k: Vec::new(),
            v: Vec::new(),
            len: 0,
            cap: 0,
        }
    }
}

/// One state's caches, of the op's [`KvCache`] type.
#[derive(Clone, Debug)]
enum Caches {
    F16(Vec<Cache<u16>>),
    F32(Vec<Cache<f32>>),
}

/// `$body` with `$c` bound to the state's `Vec<Cache<T>>`, whichever `T` it holds.
macro_rules! with_caches {
    ($caches:expr, $c:ident => $body:expr) => {
        match $caches {
            Caches::F16($c) => $body,
            Caches::F32($c) => $body,
        }
    };
}

impl<T: Elem> Cache<T> {
    /// Room for one more position in every head, growing by [`GROW_POSITIONS`] (not doubling:
    /// a long answer's cache would otherwise hold up to twice what it uses).
    fn reserve_one(&mut self, kv_heads: usize, d: usize) {
        if self.len < self.cap {
            return;
        }
        let cap = self.cap + GROW_POSITIONS;
        for m in [&mut self.k, &mut self.v] {
            // zeroed memory comes mapped but untouched: resident as positions fill it
            let mut grown = vec![T::default(); kv_heads * cap * d];
            for g in 0..kv_heads {
                let used = &m[g * self.cap * d..][..self.len * d];
                grown[g * cap * d..][..self.len * d].copy_from_slice(used);
            }
            *m = grown;
        }
        self.cap = cap;
    }

    /// Appends row `i` of `[1, kv heads, s, d]` K and V to every head.
    fn append(
        &mut self,
        isa: Isa,
        (k, v): (&[f32], &[f32]),
        kv_heads: usize,
        (s, i): (usize, usize),
        d: usize,
    ) {
        self.reserve_one(kv_heads, d);
        for g in 0..kv_heads {
            let (from, to) = ((g * s + i) * d, (g * self.cap + self.len) * d);
            kernel::narrow_into(isa, &k[from..from + d], &mut self.k[to..to + d]);
            kernel::narrow_into(isa, &v[from..from + d], &mut self.v[to..to + d]);
        }
        self.len += 1;
    }

    /// Bytes it holds (allocated).
    fn bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * size_of::<T>()
    }

    /// Head `g`'s keys and values so far, `[len, d]` each.
    fn head(&self, g: usize, d: usize) -> (&[T], &[T]) {
        let at = g * self.cap * d;
        (&self.k[at..][..self.len * d], &self.v[at..][..self.len * d])
    }
}

/// Most slots one state keeps: a row naming a slot past it is refused (a bad input must not
/// allocate without bound).
pub const MAX_SLOTS: usize = 1024;

/// Positions a KV cache grows by when it is full.
pub const GROW_POSITIONS: usize = 256;

impl KvAttentionState {
    /// Positions in slot 0's cache.
    pub fn len(&self) -> usize {
        self.slot_len(0)
    }

    /// Whether slot 0's cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `len` positions of slot 0 (no-op if there are fewer).
    pub fn truncate(&mut self, len: usize) {
        self.truncate_slot(0, len)
    }

    /// Positions in `slot`'s cache.
    pub fn slot_len(&self, slot: usize) -> usize {
        with_caches!(&self.caches, c => c.get(slot).map_or(0, |c| c.len))
    }

    /// Keeps the first `len` positions of `slot` (no-op if there are fewer); `len` 0 also gives
    /// the slot's memory back.
    pub fn truncate_slot(&mut self, slot: usize, len: usize) {
        with_caches!(&mut self.caches, c => {
            if let Some(c) = c.get_mut(slot) {
                if len == 0 {
                    *c = Cache::default();
                } else if len < c.len {
                    c.len = len;
                }
            }
        })
    }

    /// Bytes the caches hold (allocated).
    pub fn bytes(&self) -> usize {
        with_caches!(&self.caches, c => c.iter().map(Cache::bytes).sum())
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
        // slot 0's: a model with open rows reads positions from its input, not this symbol
        let len = self.len();
        let shape = [1, self.kv_heads, len, self.d];
        DynKeyValueCacheState::resolve_symbols(
            state,
            self.past_sequence_fact.clone(),
            (len > 0).then_some(&shape[..]),
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
    /// Q, K, V and an optional mask; with rows, Q, K, V, positions and slots.
    fn check_arity(&self, n: usize) -> TractResult<()> {
        if self.rows {
            ensure!(
                n == 5,
                "KvAttention with rows takes Q, K, V, positions and slots"
            );
        } else {
            ensure!(
                matches!(n, 3 | 4),
                "KvAttention takes Q, K, V and an optional mask"
            );
        }
        Ok(())
    }

    fn eval_with(
        &self,
        st: &mut KvAttentionState,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        self.check_arity(inputs.len())?;
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
            with_caches!(&st.caches, c => c.iter().all(|c| c.len == 0))
                || (st.kv_heads, st.d) == (kv_heads, d),
            "K/V shape changed within a conversation"
        );
        // everything is checked before a cache grows: a bad input leaves them as they were
        let (rows, mask) = if self.rows {
            (row_plan(st, &inputs[3], &inputs[4], s)?, None)
        } else {
            let past = st.slot_len(0);
            let rows: Vec<Row> = (0..s)
                .map(|i| Row {
                    slot: 0,
                    pos: past + i,
                })
                .collect();
            (rows, check_mask(inputs.get(3), heads, s, past + s)?)
        };
        (st.kv_heads, st.d) = (kv_heads, d);
        let need = rows.iter().map(|r| r.slot + 1).max().unwrap_or(1);
        let (k_new, v_new) = (floats(&k_new)?, floats(&v_new)?);
        let isa = Isa::best();
        with_caches!(&mut st.caches, c => {
            if c.len() < need {
                c.resize_with(need, Cache::default);
            }
            for (i, r) in rows.iter().enumerate() {
                c[r.slot].append(isa, (k_new, v_new), kv_heads, (s, i), d);
            }
        });
        let scale = self.scale.unwrap_or(1.0 / (d as f32).sqrt());

        let mut out = vec![0f32; heads * s * d];
        let q = floats(&q)?;
        with_caches!(&st.caches, c => {
            self.queries(c, (kv_heads, d), q, &rows, mask.as_ref(), scale, &mut out)
        })?;
        let out = Tensor::from_shape(&[1, heads, s, d], &out)?;
        let out = if dt == f32::datum_type() {
            out
        } else {
            out.cast_to_dt(dt)?.into_owned()
        };
        Ok(tvec!(out.into_tvalue()))
    }

    /// The queries of `rows` (each at its position of its slot's cache, which already holds
    /// it), every head: the (head, query) pairs split over the team in equal runs. A causal
    /// query sees its slot's keys up to its own position, a masked one every key plus its mask
    /// row.
    #[allow(clippy::too_many_arguments)]
    fn queries<T: Elem>(
        &self,
        caches: &[Cache<T>],
        (kv_heads, d): (usize, usize),
        q: &[f32],
        rows: &[Row],
        mask: Option<&Tensor>,
        scale: f32,
        out: &mut [f32],
    ) -> TractResult<()> {
        let s = rows.len();
        let heads = q.len() / (s * d);
        let group = heads / kv_heads;
        let mask = match mask {
            Some(m) => Some((floats(m)?, m.shape()[1] == heads)),
            None => None,
        };
        let pairs = heads * s;
        let team = self.team.as_ref().map_or(1, |t| t.threads());
        let threads = team.min(pairs);
        let isa = Isa::best();
        // a group's heads together when there are enough groups to share out evenly (not one
        // answer's decode step: its 3 groups would leave a thread of 2 idle a third of the time)
        #[cfg(target_arch = "x86_64")]
        if mask.is_none() && group > 1 && avx512::fits(isa, d) && kv_heads * s >= 4 * team {
            self.group_queries(caches, (kv_heads, d), q, rows, scale, out);
            return Ok(());
        }
        // each part takes its own contiguous run of `out`; the mutexes are never contended
        let mut rest = &mut out[..];
        let mut parts = Vec::with_capacity(threads);
        for p in 0..threads {
            let r = part_of(pairs, threads, 1, p);
            let (mine, tail) = rest.split_at_mut(r.len() * d);
            parts.push(Mutex::new((r, mine)));
            rest = tail;
        }
        let longest = rows.iter().map(|r| caches[r.slot].len).max().unwrap_or(0);
        let job = |p: usize| {
            let Some(part) = parts.get(p) else { return };
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            let (range, out) = &mut *part;
            let mut scores = vec![0f32; longest];
            for (pair, o) in range.clone().zip(out.chunks_exact_mut(d)) {
                let (h, i) = (pair / s, pair % s);
                let cache = &caches[rows[i].slot];
                let len = cache.len;
                let (k, v) = cache.head(h / group, d);
                let view = |m| Rows {
                    m,
                    stride: d,
                    off: 0,
                    d,
                };
                let (seen, mrow) = match mask {
                    Some((m, per_head)) => {
                        let mh = if per_head { h } else { 0 };
                        (len, Some(&m[(mh * s + i) * len..][..len]))
                    }
                    None if self.causal => (rows[i].pos + 1, None),
                    None => (len, None),
                };
                attend(
                    isa,
                    &q[pair * d..][..d],
                    (view(k), view(v)),
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

impl KvAttention {
    /// [`Self::queries`] a kv head's group of heads at a time ([`avx512::attend_group`]): the
    /// (kv head, row) units split over the team in equal runs, each computed into a scratch
    /// of its own and put in place after.
    #[cfg(target_arch = "x86_64")]
    fn group_queries<T: Elem>(
        &self,
        caches: &[Cache<T>],
        (kv_heads, d): (usize, usize),
        q: &[f32],
        rows: &[Row],
        scale: f32,
        out: &mut [f32],
    ) {
        let s = rows.len();
        let group = q.len() / (s * d) / kv_heads;
        let units = kv_heads * s;
        let threads = self.team.as_ref().map_or(1, |t| t.threads()).min(units);
        let isa = Isa::best();
        let mut scratch = vec![0f32; units * group * d];
        let mut rest = &mut scratch[..];
        let mut parts = Vec::with_capacity(threads);
        for p in 0..threads {
            let r = part_of(units, threads, 1, p);
            let (mine, tail) = rest.split_at_mut(r.len() * group * d);
            parts.push(Mutex::new((r, mine)));
            rest = tail;
        }
        let seen = |r: &Row| {
            if self.causal {
                r.pos + 1
            } else {
                caches[r.slot].len
            }
        };
        let longest = rows.iter().map(seen).max().unwrap_or(0);
        let job = |p: usize| {
            let Some(part) = parts.get(p) else { return };
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            let (range, out) = &mut *part;
            let mut scores = vec![0f32; group * longest.max(1)];
            for (u, o) in range.clone().zip(out.chunks_exact_mut(group * d)) {
                let (g, i) = (u / s, u % s);
                let seen = seen(&rows[i]);
                let (k, v) = caches[rows[i].slot].head(g, d);
                let view = |m| Rows {
                    m,
                    stride: d,
                    off: 0,
                    d,
                };
                let first = &q[(g * group * s + i) * d..];
                avx512::attend_group(
                    isa,
                    (first, s * d),
                    (view(k), view(v)),
                    scale,
                    seen,
                    &mut scores[..group * seen],
                    o,
                );
            }
        };
        match &self.team {
            Some(team) if threads > 1 => team.run(&job),
            _ => job(0),
        }
        for (u, o) in scratch.chunks_exact(group * d).enumerate() {
            let (g, i) = (u / s, u % s);
            for (t, o) in o.chunks_exact(d).enumerate() {
                out[((g * group + t) * s + i) * d..][..d].copy_from_slice(o);
            }
        }
    }
}

/// Where one row of a run goes: its conversation's slot and its position there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    slot: usize,
    pos: usize,
}

/// The rows of a run with open rows, checked against the caches: slots below [`MAX_SLOTS`],
/// and each slot's rows at the positions right after its cache, in order (a run appends; a
/// conversation rolled back is truncated first).
fn row_plan(
    st: &KvAttentionState,
    positions: &Tensor,
    slots: &Tensor,
    s: usize,
) -> TractResult<Vec<Row>> {
    let (positions, slots) = (positions.cast_to::<i64>()?, slots.cast_to::<i64>()?);
    let (p, sl) = (
        positions.try_as_plain_ram()?.as_slice::<i64>()?.to_vec(),
        slots.try_as_plain_ram()?.as_slice::<i64>()?.to_vec(),
    );
    ensure!(
        p.len() == s && sl.len() == s,
        "KvAttention: {} positions and {} slots for {s} rows",
        p.len(),
        sl.len()
    );
    let mut next: std::collections::HashMap<usize, usize> = Default::default();
    let mut rows = Vec::with_capacity(s);
    for (&pos, &slot) in p.iter().zip(&sl) {
        ensure!(
            (0..MAX_SLOTS as i64).contains(&slot),
            "KvAttention: slot {slot} is not in 0..{MAX_SLOTS}"
        );
        let slot = slot as usize;
        let want = next.entry(slot).or_insert_with(|| st.slot_len(slot));
        ensure!(
            pos == *want as i64,
            "KvAttention: a row of slot {slot} at position {pos}, its cache continues at {want}"
        );
        *want += 1;
        rows.push(Row {
            slot,
            pos: pos as usize,
        });
    }
    Ok(rows)
}

/// The mask of a run without open rows, checked: `[1, 1 | heads, s, len]`.
fn check_mask(
    mask: Option<&TValue>,
    heads: usize,
    s: usize,
    len: usize,
) -> TractResult<Option<Tensor>> {
    let Some(m) = mask else { return Ok(None) };
    let m = m.cast_to::<f32>()?.into_owned();
    let ms = m.shape();
    ensure!(
        ms.len() == 4 && ms[0] == 1 && (ms[1] == 1 || ms[1] == heads) && ms[2] == s && ms[3] == len,
        "mask {ms:?} does not fit [1, 1 | {heads}, {s}, {len}]"
    );
    Ok(Some(m))
}

/// `o = softmax(scale * K_g q + mask) V_g` for one head over the whole cache.
fn attend<T: Elem>(
    isa: Isa,
    q: &[f32],
    (k, v): (Rows<'_, T>, Rows<'_, T>),
    scale: f32,
    mask: Option<&[f32]>,
    scores: &mut [f32],
    o: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512::fits(isa, q.len()) {
        return avx512::attend(isa, q, (k, v), scale, mask, scores, o);
    }
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
/// inputs, same output), sharing `team`, its caches of type `kv`. Returns the type the
/// model's caches are counted as: `kv`, or f32 where a layout this op does not keep leaves
/// tract's own cache in place. `rows`: the model's position and slot inputs, when its
/// rows are open ([`crate::rows`]): every attention takes them (a mask cannot go with them).
pub fn install(
    model: &mut TypedModel,
    team: Option<&Arc<Team>>,
    rows: Option<(OutletId, OutletId)>,
    kv: KvCache,
) -> TractResult<KvCache> {
    // f32 if any cache stays tract's own (its keys and values are f32): what a session's KV
    // memory is counted as
    let mut kept = kv;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(op) = node.op_as::<InPlaceKvSdpa>() else {
            continue;
        };
        if op.axis != 2 {
            // a layout this op does not keep: tract's own cache cannot take rows
            ensure!(rows.is_none(), "{}: a cache layout without rows", node.name);
            kept = KvCache::F32;
            continue;
        }
        let with_rows = rows.is_some();
        ensure!(
            !with_rows || (node.inputs.len() == 3 && op.causal),
            "{}: attention with a mask cannot take rows of several conversations",
            node.name
        );
        let ours = KvAttention {
            name: op.name.clone(),
            past_sequence_fact: op.past_sequence_fact.clone(),
            causal: op.causal,
            scale: op.scale,
            team: team.cloned(),
            rows: with_rows,
            kv,
        };
        model.nodes[id].op = Box::new(ours);
        if let Some((positions, slots)) = rows {
            model.add_edge(positions, InletId::new(id, 3))?;
            model.add_edge(slots, InletId::new(id, 4))?;
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests;
