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

thread_local! {
    // activations of the op this thread is evaluating, and the two halves of a precise
    // product: reused, so a decode step allocates none
    static ACTS: std::cell::RefCell<(QuantizedActs, Vec<f32>)> = std::cell::RefCell::default();
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
        ACTS.with_borrow_mut(|(acts, halves)| {
            let mut plain = y.try_as_plain_ram_mut()?;
            let y = plain.as_slice_mut::<f32>()?;
            acts.quantize_on(self.team.as_deref(), x, rows, w.k, self.precise);
            let out = if self.precise {
                halves.resize(2 * y.len(), 0.0);
                &mut halves[..]
            } else {
                &mut *y
            };
            gemm_on(self.team.as_deref(), Isa::best(), &w, acts, out);
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
