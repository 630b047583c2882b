//! The tract side of the GGUF blocks: the run-time ops [`GgmlMatMul`] and [`GgmlGather`] over
//! packed weights held as graph constants. Their NNEF form (extension `fieldllm`) is in
//! [`nnef`]; the import transform that puts them in place of an ONNX package's f32 products is
//! in [`import`].
//!
//! The packed weights are ordinary u8 constants, so tract saves and loads them as NNEF tensors
//! and nothing outside this module knows the format. One constant can feed several ops: the
//! tied embedding and LM head share theirs.

use std::sync::Arc;

use tract_core::internal::*;

use super::kernel::{Isa, gemm_on};
use super::packed::{GROUP, Packed, group_block_bytes};
use super::{BLOCK, BlockKind, QuantizedActs};
use crate::cpu::Team;

pub mod import;
pub mod nnef;

pub use import::{BlockTensor, install_blocks};
pub use nnef::registry;

/// `y[..., n] = x[..., k] . w[n, k]` (inputs: x, and `w` packed: u8 `[groups, k / 32, bytes]`,
/// see [`super::packed`]).
#[derive(Clone, Debug)]
pub struct GgmlMatMul {
    /// Weight block type.
    pub kind: BlockKind,
    /// Rows of `w` (the packed form pads them to a multiple of 8).
    pub n: usize,
    /// Activations quantized with their remainder (see
    /// [`QuantizedActs::quantize_with_remainder`]): twice the arithmetic, 15-bit activations.
    pub precise: bool,
    /// Threads that split the rows; set after loading (none: this thread only).
    pub team: Option<Arc<Team>>,
}

impl PartialEq for GgmlMatMul {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, self.n, self.precise) == (other.kind, other.n, other.precise)
    }
}

impl Eq for GgmlMatMul {}

/// `y[ids..., k] = w[id, :]` dequantized (inputs: ids, and `w` packed as for [`GgmlMatMul`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgmlGather {
    /// Weight block type.
    pub kind: BlockKind,
    /// Rows of `w`.
    pub n: usize,
}

/// `k` from the packed weight's fact `[groups, k / 32, bytes]`, checked against `kind`, `n`.
fn k_of(kind: BlockKind, n: usize, w: &TypedFact) -> TractResult<usize> {
    let s = w
        .shape
        .as_concrete()
        .context("packed weights have a fixed shape")?;
    ensure!(
        s.len() == 3 && s[0] == n.div_ceil(GROUP) && s[2] == group_block_bytes(kind),
        "packed {} weights for {n} rows must be [{}, k / 32, {}], got {s:?}",
        kind.name(),
        n.div_ceil(GROUP),
        group_block_bytes(kind)
    );
    Ok(s[1] * BLOCK)
}

fn weights(kind: BlockKind, n: usize, input: &TValue) -> TractResult<Packed<'_>> {
    // mapped from the artifact's file when loaded from one (no copy), else tract's own bytes
    let bytes = crate::mapped::mapped_bytes(input)?;
    let shape = input.shape();
    ensure!(
        shape.len() == 3,
        "packed weights must be [groups, blocks, bytes]"
    );
    Packed::new(kind, n, shape[1] * BLOCK, bytes).map_err(|e| anyhow!(e))
}

/// What a thread's products keep between calls: the last activations quantized and what they
/// were quantized from, and the two halves of a precise product. Reused, so a decode step
/// allocates none.
#[derive(Default)]
struct Scratch {
    acts: QuantizedActs,
    /// The input `acts` holds, kept alive so that no other tensor can take its address, and
    /// whether it was quantized with its remainder.
    from: Option<(TValue, bool)>,
    halves: Vec<f32>,
}

impl Scratch {
    /// `acts` for `x` (`values`: its `rows` rows of `k`): quantized again unless they are
    /// already `x`'s, quantized the same way. Products of one input (a layer's query, key and value, its
    /// gate and up) take the same tensor, and quantize it once: a 4-answer step's 210
    /// quantizations of SmolLM2 took 190-200 µs on the caller while the team waited.
    fn quantize(
        &mut self,
        team: Option<&Team>,
        (x, values): (&TValue, &[f32]),
        rows: usize,
        k: usize,
        precise: bool,
    ) {
        let same = match (&self.from, x.as_arc_tensor()) {
            (Some((held, p)), Some(x)) => {
                *p == precise
                    && self.acts.k == k
                    && held.as_arc_tensor().is_some_and(|h| Arc::ptr_eq(h, x))
            }
            _ => false,
        };
        if !same {
            self.from = None;
            self.acts.quantize_on(team, values, rows, k, precise);
            self.from = Some((x.clone(), precise));
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl Op for GgmlMatMul {
    fn name(&self) -> StaticName {
        format!("GgmlMatMul{}", self.kind.name()).into()
    }
    op_as_typed_op!();
}

impl EvalOp for GgmlMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2, "GgmlMatMul inputs");
        let w = weights(self.kind, self.n, &inputs[1])?;
        let x = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let xs = inputs[0].shape();
        ensure!(
            xs.last() == Some(&w.k),
            "input {xs:?} does not end with k = {}",
            w.k
        );
        let rows = x.len() / w.k;
        let mut shape: TVec<usize> = xs.into();
        if let Some(last) = shape.last_mut() {
            *last = w.n;
        }
        let mut y = Tensor::zero::<f32>(&shape)?;
        SCRATCH.with_borrow_mut(|scratch| {
            let mut plain = y.try_as_plain_ram_mut()?;
            let y = plain.as_slice_mut::<f32>()?;
            let team = self.team.as_deref();
            scratch.quantize(team, (&inputs[0], x), rows, w.k, self.precise);
            let Scratch { acts, halves, .. } = scratch;
            let out = if self.precise {
                halves.resize(2 * y.len(), 0.0);
                &mut halves[..]
            } else {
                &mut *y
            };
            gemm_on(team, Isa::best(), &w, acts, out);
            if self.precise {
                let (value, rest) = halves.split_at(y.len());
                for ((y, v), r) in y.iter_mut().zip(value).zip(rest) {
                    *y = v + r;
                }
            }
            TractResult::Ok(())
        })?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for GgmlMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "GgmlMatMul inputs");
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "GgmlMatMul takes f32"
        );
        let (n, k) = (self.n, k_of(self.kind, self.n, inputs[1])?);
        let mut shape = inputs[0].shape.to_tvec();
        ensure!(
            shape.last() == Some(&k.to_dim()),
            "input {:?} does not end with k = {k}",
            inputs[0].shape
        );
        if let Some(last) = shape.last_mut() {
            *last = n.to_dim();
        }
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let (n, k) = (self.n, k_of(self.kind, self.n, inputs[1])?);
        let rows = inputs[0].shape.volume() / k;
        Ok(tvec!((Cost::FMA(f32::datum_type()), rows * n * k)))
    }

    as_op!();
}

impl Op for GgmlGather {
    fn name(&self) -> StaticName {
        format!("GgmlGather{}", self.kind.name()).into()
    }
    op_as_typed_op!();
}

impl EvalOp for GgmlGather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2, "GgmlGather inputs");
        let w = weights(self.kind, self.n, &inputs[1])?;
        let ids = inputs[0].cast_to::<i64>()?;
        let ids = ids.try_as_plain_ram()?;
        let ids = ids.as_slice::<i64>()?;
        let mut shape: TVec<usize> = inputs[0].shape().into();
        shape.push(w.k);
        let mut y = Tensor::zero::<f32>(&shape)?;
        let mut plain = y.try_as_plain_ram_mut()?;
        let out = plain.as_slice_mut::<f32>()?;
        for (row, &id) in out.chunks_exact_mut(w.k).zip(ids) {
            // ONNX Gather: negative ids count from the end
            let r = if id < 0 { id + w.n as i64 } else { id };
            ensure!(
                (0..w.n as i64).contains(&r),
                "token id {id} is outside the vocabulary (0..{})",
                w.n
            );
            w.dequantize_row(r as usize, row);
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for GgmlGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "GgmlGather inputs");
        let k = k_of(self.kind, self.n, inputs[1])?;
        let mut shape = inputs[0].shape.to_tvec();
        shape.push(k.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Gives every [`GgmlMatMul`] of a loaded model the same team.
pub fn install_team(model: &mut TypedModel, team: Option<&Arc<Team>>) {
    for node in &mut model.nodes {
        if let Some(op) = node.op_as_mut::<GgmlMatMul>() {
            op.team = team.cloned();
        }
    }
}

/// Applies the activation setting at load: with [`Activations::Bits8`] no product keeps its
/// artifact's `precise` mark.
pub fn install_activations(model: &mut TypedModel, activations: super::Activations) {
    for node in &mut model.nodes {
        if let Some(op) = node.op_as_mut::<GgmlMatMul>() {
            op.precise &= activations == super::Activations::Precise;
        }
    }
}

/// Whether the model runs GGUF blocks (one of these ops present).
pub fn uses_blocks(model: &TypedModel) -> bool {
    model
        .nodes
        .iter()
        .any(|n| n.op_is::<GgmlMatMul>() || n.op_is::<GgmlGather>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::OwnedWeights;
    use crate::ggml::packed::pack;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    /// Q4_1 weights `[n, k]` as the op takes them (packed, `[groups, k / 32, bytes]`).
    fn packed(n: usize, k: usize, seed: u64) -> TValue {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        for _ in 0..n * k / BLOCK {
            bytes.extend(f16::from_f32(0.01 + (rng.next_u32() % 100) as f32 * 1e-4).to_le_bytes());
            bytes.extend(f16::from_f32(-((rng.next_u32() % 100) as f32) * 1e-3).to_le_bytes());
            bytes.extend((0..16).map(|_| rng.next_u32() as u8));
        }
        let w = OwnedWeights::from_gguf(BlockKind::Q4_1, n, k, &bytes).unwrap();
        let shape = [n.div_ceil(GROUP), k / BLOCK, group_block_bytes(w.kind)];
        Tensor::from_shape(&shape, &pack(&w)).unwrap().into_tvalue()
    }

    fn activations(rows: usize, k: usize, seed: u64) -> TValue {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<f32> = (0..rows * k)
            .map(|_| rng.next_u32() as f32 / u32::MAX as f32 - 0.5)
            .collect();
        Tensor::from_shape(&[1, rows, k], &x).unwrap().into_tvalue()
    }

    /// `x . w` through the op, on this thread.
    fn product(w: &TValue, x: &TValue, precise: bool) -> Vec<f32> {
        let op = GgmlMatMul {
            kind: BlockKind::Q4_1,
            n: w.shape()[0] * GROUP,
            precise,
            team: None,
        };
        let y = op
            .eval(&EvalContext::out_of_plan(), tvec![x.clone(), w.clone()])
            .unwrap();
        y[0].try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    /// `x . w` with activations quantized afresh: the op on a thread of its own.
    fn alone(w: &TValue, x: &TValue, precise: bool) -> Vec<f32> {
        let (w, x) = (w.clone(), x.clone());
        std::thread::spawn(move || product(&w, &x, precise))
            .join()
            .unwrap()
    }

    /// Products of one input tensor quantize it once and reuse it; a new tensor, even one
    /// with the same shape, or the same tensor asked with the other precision, is quantized
    /// again: every product has the bits of the same product quantized afresh.
    #[test]
    fn products_of_one_input_share_its_quantization_and_no_other() {
        let (wq, wk, wu) = (packed(64, 96, 1), packed(16, 96, 2), packed(64, 96, 3));
        let (x, y) = (activations(3, 96, 4), activations(3, 96, 5));
        let calls = [
            (&wq, &x, false),
            (&wk, &x, false),
            (&wk, &x, true),
            (&wu, &x, true),
            (&wq, &y, false),
            (&wu, &x, false),
            (&wk, &y, true),
        ];
        let mut results = Vec::new();
        for (w, x, precise) in calls {
            let got = product(w, x, precise);
            assert_eq!(got, alone(w, x, precise), "precise {precise}");
            results.push(got);
        }
        // the inputs and precisions do make a difference: a stale quantization would show
        assert_ne!(results[1], results[2]);
        assert_ne!(results[0], results[4]);
        // a tensor dropped and another made in its place is quantized again, whatever its
        // address
        for seed in 10..20 {
            let z = activations(3, 96, seed);
            assert_eq!(product(&wq, &z, false), alone(&wq, &z, false));
        }
    }
}
