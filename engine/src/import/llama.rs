//! A Llama-family GGUF as a tract graph, built in code: the same ops, in the same arithmetic,
//! as the Python converter's ONNX graph after tract's transforms (`graph::import`), so an
//! artifact made either way computes the same logits; but no f32 copy of the weights is ever
//! made: the products take the file's blocks as they are.
//!
//! Shape: `input_ids` `[1, S]` -> embedding lookup -> per layer: RMS norm, Q/K/V products,
//! rotary embedding (tables of cos/sin per position), key/value caches (tract's
//! `DynKeyValueCache`, `P` past positions), scaled dot-product attention (grouped-query: more
//! query heads than key/value heads), output product, residual; RMS norm, SiLU-gated MLP,
//! residual -> the last position only -> RMS norm -> LM head -> `logits` `[1, vocab]`.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::array::{Gather, Range};
use tract_core::ops::einsum::EinSum;
use tract_core::ops::math;
use tract_core::ops::nn::RmsNorm;
use tract_core::ops::nn::silu::silu;
use tract_transformers::ops::apply_rope::ApplyRope;
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCache;
use tract_transformers::ops::sdpa::Sdpa;

pub use super::hyper::{ARCHITECTURES, Hyper};
use super::weights::{Matrix, TensorReader};
use super::{Gguf, ImportError};
use crate::ggml::op::{GgmlGather, GgmlMatMul};
use crate::ggml::packed::{GROUP, group_block_bytes, pack};
use crate::ggml::{BLOCK, BlockKind, OwnedWeights};

/// Rotary tables `[positions, head_dim / 2]`: `cos` and `sin` of `p * base^(-2i / d)`, divided
/// by Llama 3.1's factor per frequency when given, computed in f64 and rounded once to f32
/// (as the Python converter's `rope_tables`).
pub fn rope_tables(
    head_dim: usize,
    positions: usize,
    base: f32,
    factors: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| {
            let f = (base as f64).powf(-((2 * i) as f64) / head_dim as f64);
            factors.map_or(f, |ff| f / ff[i] as f64)
        })
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

struct Builder<'g> {
    g: &'g Gguf,
    h: &'g Hyper,
    reader: TensorReader,
    model: TypedModel,
    s: TDim,
    p: TDim,
    /// The packed (or dense) constant of each GGUF tensor used so far: the tied head shares
    /// the embedding's.
    consts: HashMap<String, (OutletId, Option<BlockKind>)>,
}

/// Builds the decoder graph of `g` (checked by [`Hyper::read`]), weights read from its file.
pub fn build(g: &Gguf, h: &Hyper) -> Result<TypedModel, ImportError> {
    let model = TypedModel::default();
    let s = model.symbols.sym("S").to_dim();
    let p = model.symbols.sym("P").to_dim();
    let mut b = Builder {
        g,
        h,
        reader: TensorReader::open(g)?,
        model,
        s,
        p,
        consts: HashMap::new(),
    };
    b.decoder().map_err(|e| match e.downcast::<ImportError>() {
        Ok(e) => e,
        Err(e) => ImportError::Invalid {
            path: g.path.clone(),
            what: format!("building the graph: {e:#}"),
        },
    })?;
    let mut model = b.model;
    model.declutter().map_err(|e| ImportError::Invalid {
        path: g.path.clone(),
        what: format!("building the graph: {e:#}"),
    })?;
    Ok(model)
}

impl Builder<'_> {
    fn wire(
        &mut self,
        name: impl Into<String>,
        op: impl Into<Box<dyn TypedOp>>,
        inputs: &[OutletId],
    ) -> TractResult<OutletId> {
        Ok(self.model.wire_node(name, op, inputs)?[0])
    }

    fn konst(&mut self, name: &str, t: Tensor) -> TractResult<OutletId> {
        self.model.add_const(name, t)
    }

    fn decoder(&mut self) -> TractResult<()> {
        let h = self.h.clone();
        let ids = self
            .model
            .add_source("input_ids", i64::fact([1.to_dim(), self.s.clone()]))?;
        let mut x = self.lookup(ids)?;
        let (cos, sin) = self.rope_inputs()?;
        for i in 0..h.layers {
            x = self.layer(i, x, cos, sin)?;
        }
        let last = self.konst("last_idx", tensor0(-1i64))?;
        let x = self.wire("last_hidden", Gather::new(1), &[x, last])?;
        let x = self.norm("final_norm", "output_norm.weight", x, 1)?;
        let head = if h.untied_head {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let logits = self.product("logits", head, "lm_head", x, [h.vocab, h.hidden], None)?;
        self.model.select_output_outlets(&[logits])?;
        Ok(())
    }

    /// The embedding: a lookup of rows in the file's own blocks (or floats).
    fn lookup(&mut self, ids: OutletId) -> TractResult<OutletId> {
        let (vocab, hidden) = (self.h.vocab, self.h.hidden);
        match self.weight("embed_tokens", "token_embd.weight", [vocab, hidden], None)? {
            (w, Some(kind)) => self.wire("h0", GgmlGather { kind, n: vocab }, &[ids, w]),
            (w, None) => self.wire("h0", Gather::new(0), &[w, ids]),
        }
    }

    /// Positions `P .. P + S` and the rotary tables gathered at them, `[1, S, 1, hd]`: each
    /// position's `hd / 2` values twice, as tract's `ApplyRope` takes them.
    fn rope_inputs(&mut self) -> TractResult<(OutletId, OutletId)> {
        let h = self.h.clone();
        let factors = if h.rope_freqs {
            Some(
                self.reader
                    .vector(self.g, "rope_freqs.weight", h.head_dim / 2)?,
            )
        } else {
            None
        };
        let (cos, sin) = rope_tables(h.head_dim, h.context, h.rope_base, factors.as_deref());
        let start = self.konst("past_len", tensor0(self.p.clone()))?;
        let end = self.konst("end_pos", tensor0(self.p.clone() + self.s.clone()))?;
        let one = self.konst("one", tensor0(TDim::from(1)))?;
        let pos = self.wire("positions", Range::new(self.s.clone()), &[start, end, one])?;
        let pos = self.wire("position_ids", AxisOp::Add(0), &[pos])?;
        let mut out = vec![];
        for (name, table) in [("rope_cos", cos), ("rope_sin", sin)] {
            let twice: Vec<f32> = table
                .chunks(h.head_dim / 2)
                .flat_map(|row| row.iter().chain(row).copied())
                .collect();
            let t = self.konst(name, Tensor::from_shape(&[h.context, h.head_dim], &twice)?)?;
            let at = self.wire(format!("{name}.gather"), Gather::new(0), &[t, pos])?;
            out.push(self.wire(format!("{name}.unsqueeze"), AxisOp::Add(2), &[at])?);
        }
        Ok((out[0], out[1]))
    }

    fn layer(
        &mut self,
        i: usize,
        x: OutletId,
        cos: OutletId,
        sin: OutletId,
    ) -> TractResult<OutletId> {
        let h = self.h.clone();
        let (l, p) = (format!("l{i}"), format!("blk.{i}."));
        let a = self.norm(
            &format!("{l}.attn_in"),
            &format!("{p}attn_norm.weight"),
            x,
            2,
        )?;
        let (q, k, v) = self.qkv(i, a)?;
        let q = self.rope(&format!("{l}.q_rot"), q, h.heads, cos, sin)?;
        let k = self.rope(&format!("{l}.k_rot"), k, h.kv_heads, cos, sin)?;
        let q = self.wire(format!("{l}.q_t"), AxisOp::Move(1, 2), &[q])?;
        let k = self.wire(format!("{l}.k_t"), AxisOp::Move(1, 2), &[k])?;
        let v = self.split_heads(&format!("{l}.v"), v, h.kv_heads)?;
        let v = self.wire(format!("{l}.v_t"), AxisOp::Move(1, 2), &[v])?;
        let k = self.cache(&format!("past_key_{i}"), k)?;
        let v = self.cache(&format!("past_value_{i}"), v)?;
        let sdpa = Sdpa {
            scale: Some(tensor0((1.0f64 / (h.head_dim as f64).sqrt()) as f32)),
            datum_type: f32::datum_type(),
            acc_datum_type: f32::datum_type(),
            is_causal: true,
        };
        let y = self.wire(format!("{l}.sdpa"), sdpa, &[q, k, v])?;
        let y = self.wire(format!("{l}.y_t"), AxisOp::Move(2, 1), &[y])?;
        let y = self.wire(
            format!("{l}.y_merge"),
            AxisOp::Reshape(
                2,
                tvec![h.heads.to_dim(), h.head_dim.to_dim()],
                tvec![h.hidden.to_dim()],
            ),
            &[y],
        )?;
        let o = self.product(
            &format!("{l}.o"),
            &format!("{p}attn_output.weight"),
            "wo",
            y,
            [h.hidden, h.hidden],
            None,
        )?;
        let r = self.wire(format!("{l}.resid1"), math::add(), &[x, o])?;
        let f = self.norm(&format!("{l}.ffn_in"), &format!("{p}ffn_norm.weight"), r, 2)?;
        let gate = self.product(
            &format!("{l}.gate"),
            &format!("{p}ffn_gate.weight"),
            "wgate",
            f,
            [h.ffn, h.hidden],
            None,
        )?;
        let up = self.product(
            &format!("{l}.up"),
            &format!("{p}ffn_up.weight"),
            "wup",
            f,
            [h.ffn, h.hidden],
            None,
        )?;
        let gate = self.wire(format!("{l}.gate_silu"), silu(), &[gate])?;
        let act = self.wire(format!("{l}.act"), math::mul(), &[gate, up])?;
        let d = self.product(
            &format!("{l}.down"),
            &format!("{p}ffn_down.weight"),
            "wdown",
            act,
            [h.hidden, h.ffn],
            None,
        )?;
        self.wire(format!("{l}.out"), math::add(), &[r, d])
    }

    /// Layer `i`'s query, key and value products of `a` (Qwen2's with their biases).
    fn qkv(&mut self, i: usize, a: OutletId) -> TractResult<(OutletId, OutletId, OutletId)> {
        let h = self.h.clone();
        let kv = h.kv_heads * h.head_dim;
        let mut out = vec![];
        for (t, role, rows, heads) in [
            ("q", "wq", h.hidden, h.heads),
            ("k", "wk", kv, h.kv_heads),
            ("v", "wv", kv, 0),
        ] {
            // Llama's Q/K rows come back from llama.cpp's rotary order; Qwen2's are in ours
            let permuted = (heads > 0 && !h.qkv_bias).then_some(heads);
            let (name, w) = (format!("l{i}.{t}"), format!("blk.{i}.attn_{t}.weight"));
            let mut y = self.product(&name, &w, role, a, [rows, h.hidden], permuted)?;
            if h.qkv_bias {
                y = self.bias(&name, &format!("blk.{i}.attn_{t}.bias"), y, rows)?;
            }
            out.push(y);
        }
        Ok((out[0], out[1], out[2]))
    }

    /// `x[1, S, n] + b[n]`, the file's bias.
    fn bias(&mut self, name: &str, tensor: &str, x: OutletId, n: usize) -> TractResult<OutletId> {
        let b = self.reader.vector(self.g, tensor, n)?;
        let b = self.konst(&format!("{name}.bias"), Tensor::from_shape(&[1, 1, n], &b)?)?;
        self.wire(format!("{name}.biased"), math::add(), &[x, b])
    }

    /// RMS norm over `axis` (the last), times the file's weight.
    fn norm(
        &mut self,
        name: &str,
        weight: &str,
        x: OutletId,
        axis: usize,
    ) -> TractResult<OutletId> {
        let hidden = self.h.hidden;
        let w = self.reader.vector(self.g, weight, hidden)?;
        let mut shape = vec![1; axis];
        shape.push(hidden);
        let w = self.konst(&format!("{name}.weight"), Tensor::from_shape(&shape, &w)?)?;
        let eps = Arc::new(tensor0(self.h.rms_eps));
        let n = self.wire(format!("{name}.rms"), RmsNorm { axis, eps }, &[x])?;
        self.wire(format!("{name}.scaled"), math::mul(), &[n, w])
    }

    /// `x[.., k] . w[n, k]` with the file's tensor `tensor` (`[n, k]` by the metadata).
    #[allow(clippy::too_many_arguments)]
    fn product(
        &mut self,
        name: &str,
        tensor: &str,
        role: &str,
        x: OutletId,
        shape: [usize; 2],
        heads: Option<usize>,
    ) -> TractResult<OutletId> {
        let (w, kind) = self.weight(&format!("{name}.w"), tensor, shape, heads)?;
        match kind {
            Some(kind) => {
                let op = GgmlMatMul {
                    kind,
                    n: shape[0],
                    precise: crate::ggml::precise_role(role),
                    team: None,
                };
                self.wire(name, op, &[x, w])
            }
            None => {
                let rank = self.model.outlet_fact(x)?.rank();
                let axes = if rank == 3 {
                    "abk,nk->abn"
                } else {
                    "ak,nk->an"
                };
                self.wire(name, EinSum::new(axes.parse()?, f32::datum_type()), &[x, w])
            }
        }
    }

    /// The constant holding the file's tensor `tensor` (rows un-permuted for `heads`), made
    /// once: packed blocks (checked through this CPU's kernels against their dequantized
    /// product) and their kind, or f32 `[n, k]`.
    fn weight(
        &mut self,
        name: &str,
        tensor: &str,
        shape: [usize; 2],
        heads: Option<usize>,
    ) -> TractResult<(OutletId, Option<BlockKind>)> {
        let key = format!("{tensor}/{heads:?}");
        if let Some(found) = self.consts.get(&key) {
            return Ok(*found);
        }
        let made = match self.reader.matrix(self.g, tensor, shape, heads)? {
            Matrix::Blocks(w) => (self.konst(name, packed_tensor(&w, tensor)?)?, Some(w.kind)),
            Matrix::Dense { n, k, values } => (
                self.konst(name, Tensor::from_shape(&[n, k], &values)?)?,
                None,
            ),
        };
        self.consts.insert(key, made);
        Ok(made)
    }

    /// `[1, S, heads * hd]` -> `[1, S, heads, hd]`.
    fn split_heads(&mut self, name: &str, x: OutletId, heads: usize) -> TractResult<OutletId> {
        let hd = self.h.head_dim;
        self.wire(
            format!("{name}.split_heads"),
            AxisOp::Reshape(
                2,
                tvec![(heads * hd).to_dim()],
                tvec![heads.to_dim(), hd.to_dim()],
            ),
            &[x],
        )
    }

    /// Rotary embedding, half-split form: `[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`, in
    /// one node (tract's `ApplyRope`: `x * cos + [-x2, x1] * sin`, the same f32 operations as
    /// the ONNX graph's slices, products and sums, which cost ten nodes per call).
    fn rope(
        &mut self,
        name: &str,
        x: OutletId,
        heads: usize,
        cos: OutletId,
        sin: OutletId,
    ) -> TractResult<OutletId> {
        let x = self.split_heads(name, x, heads)?;
        self.wire(format!("{name}.apply"), ApplyRope, &[x, cos, sin])
    }

    /// A key or value cache: past positions (`P`) kept by tract's state, the new ones appended.
    fn cache(&mut self, name: &str, x: OutletId) -> TractResult<OutletId> {
        let h = self.h;
        let fact =
            |len: TDim| f32::fact([1.to_dim(), h.kv_heads.to_dim(), len, h.head_dim.to_dim()]);
        let op = DynKeyValueCache {
            name: name.to_string(),
            axis: 2,
            past_sequence_fact: fact(self.p.clone()),
            input_sequence_fact: fact(self.s.clone()),
        };
        self.wire(name, op, &[x])
    }
}

/// The packed blocks as a u8 constant `[groups, k / 32, bytes]`, after checking them through
/// this CPU's kernels.
fn packed_tensor(w: &OwnedWeights, name: &str) -> TractResult<Tensor> {
    let shape = [w.n.div_ceil(GROUP), w.k / BLOCK, group_block_bytes(w.kind)];
    let bytes = pack(w);
    crate::ggml::op::import::check_product(w, &bytes, name)?;
    Tensor::from_shape(&shape, &bytes)
}
