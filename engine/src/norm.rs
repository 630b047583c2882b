//! RMS normalization and its weight in one op: [`NormScale`] takes the place of tract's
//! `RmsNorm` (last axis) and the `Mul` by a constant that follows it when a model is loaded.
//!
//! Why: tract runs the two as two passes, the norm's rows split over its rayon pool, whose
//! threads contend for the cores with the kernels' team (spinning between products): the
//! pair took 86 us of a ~1000 us prefill token (SmolLM2 Q4_0, 2 threads, `fieldllmd bench
//! --profile`), for 0.6 MB of values. Here one pass per row, the rows split over the team
//! that runs the products.

use std::sync::{Arc, Mutex, PoisonError};

use tract_core::internal::*;
use tract_core::ops::binary::{OptBinUnicast, TypedBinOp};
use tract_core::ops::math::Mul;
use tract_core::ops::nn::RmsNorm;

use crate::cpu::{Team, part_of};

/// Rows from which a norm splits over the team (a decode step's one row stays on the caller).
const SHARE_FROM_ROWS: usize = 8;

/// `y = x / sqrt(mean(x^2) + eps) * weight` over the last axis of f32 `x`; `weight` has the
/// last axis's length.
#[derive(Clone, Debug)]
pub struct NormScale {
    /// Added to the mean of squares.
    pub eps: f32,
    /// One factor per value of a row.
    pub weight: Arc<Vec<f32>>,
    /// Threads that split the rows; none: this thread only.
    pub team: Option<Arc<Team>>,
}

impl PartialEq for NormScale {
    fn eq(&self, other: &Self) -> bool {
        self.eps.to_bits() == other.eps.to_bits() && self.weight == other.weight
    }
}

impl Eq for NormScale {}

impl std::hash::Hash for NormScale {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.eps.to_bits().hash(state);
        self.weight.len().hash(state);
    }
}

impl Op for NormScale {
    fn name(&self) -> StaticName {
        "NormScale".into()
    }
    op_as_typed_op!();
}

impl EvalOp for NormScale {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(x.datum_type() == f32::datum_type(), "NormScale takes f32");
        let k = self.weight.len();
        ensure!(
            x.shape().last() == Some(&k) && k > 0,
            "NormScale: input {:?} does not end with {k}",
            x.shape()
        );
        // in place: no copy when this op holds the input's only reference
        let mut x = x.into_tensor();
        {
            let mut plain = x.try_as_plain_ram_mut()?;
            self.rows(plain.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

impl NormScale {
    /// Normalizes every row of `x` in place, the rows split over the team.
    fn rows(&self, x: &mut [f32]) {
        let k = self.weight.len();
        let n = x.len() / k;
        let threads = match &self.team {
            Some(t) if n >= SHARE_FROM_ROWS => t.threads(),
            _ => 1,
        };
        let mut rest = x;
        let mut parts = Vec::with_capacity(threads);
        for p in 0..threads {
            let (mine, tail) =
                std::mem::take(&mut rest).split_at_mut(part_of(n, threads, 1, p).len() * k);
            parts.push(Mutex::new(mine));
            rest = tail;
        }
        let job = |p: usize| {
            if let Some(part) = parts.get(p) {
                let mut part = part.lock().unwrap_or_else(PoisonError::into_inner);
                for row in part.chunks_exact_mut(k) {
                    norm_row(row, &self.weight, self.eps);
                }
            }
        };
        match &self.team {
            Some(team) if threads > 1 => team.run(&job),
            _ => job(0),
        }
    }
}

/// One row: the mean of squares summed in f64 (as ggml's `rms_norm`: 576 to 2048 values a
/// row, where an f32 sum drifts by a few units in the last place), then `x * scale * w` as
/// ggml's norm followed by its weight.
fn norm_row(row: &mut [f32], weight: &[f32], eps: f32) {
    let sum = sum_of_squares(row);
    let mean = (sum / row.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, w) in row.iter_mut().zip(weight) {
        *v = *v * scale * w;
    }
}

/// `sum(v^2)` in f64 over 16 lanes, which the compiler keeps in vector registers: one chain
/// of 576 dependent f64 additions took ~1 µs a row, a norm of a 4-answer decode step 2.5 µs,
/// 61 of them a step (`fieldllmd bench --parallel 4 --profile`).
fn sum_of_squares(row: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut lanes = [0f64; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += (v as f64) * (v as f64);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

impl TypedOp for NormScale {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "NormScale takes one input");
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "NormScale takes f32"
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// The weight of a `Mul` that follows a norm: the other input's constant, f32, one value per
/// position of the last axis (leading axes 1).
fn mul_weight(model: &TypedModel, mul: &TypedNode, norm: OutletId, k: usize) -> Option<Vec<f32>> {
    let is_mul = mul
        .op_as::<OptBinUnicast>()
        .is_some_and(|b| b.binop.is::<Mul>())
        || mul.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>());
    if !is_mul || mul.inputs.len() != 2 {
        return None;
    }
    let other = if mul.inputs[0] == norm {
        mul.inputs[1]
    } else {
        mul.inputs[0]
    };
    let konst = model.outlet_fact(other).ok()?.konst.clone()?;
    let shape = konst.shape();
    let leading_ones = shape[..shape.len().saturating_sub(1)]
        .iter()
        .all(|&d| d == 1);
    if konst.datum_type() != f32::datum_type() || shape.last() != Some(&k) || !leading_ones {
        return None;
    }
    let plain = konst.try_as_plain_ram().ok()?;
    Some(plain.as_slice::<f32>().ok()?.to_vec())
}

/// Puts a [`NormScale`] in place of every f32 last-axis `RmsNorm` whose one successor is a
/// `Mul` by a constant row (same output), sharing `team`.
pub fn install(model: &mut TypedModel, team: Option<&Arc<Team>>) -> TractResult<()> {
    let mut fused = 0;
    for id in 0..model.nodes.len() {
        let node = model.nodes[id].clone();
        let Some(norm) = node.op_as::<RmsNorm>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        let rank = fact.rank();
        let Some(k) = fact.shape.last().and_then(|d| d.to_usize().ok()) else {
            continue;
        };
        if fact.datum_type != f32::datum_type() || norm.axis + 1 != rank {
            continue;
        }
        let Some(succ) = model.single_succ(id)? else {
            continue;
        };
        let Some(weight) = mul_weight(model, succ, OutletId::new(id, 0), k) else {
            continue;
        };
        if model.outlet_fact(OutletId::new(succ.id, 0))?.shape != fact.shape {
            continue; // the Mul broadcast beyond the norm's shape
        }
        let op = NormScale {
            eps: norm.eps.cast_to_scalar::<f32>()?,
            weight: Arc::new(weight),
            team: team.cloned(),
        };
        TypedModelPatch::fuse_with_next(model, &node, op)?.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| rng.next_u32() as f32 / u32::MAX as f32 * 4.0 - 2.0)
            .collect()
    }

    /// x -> RmsNorm -> Mul(weight), as an import writes it.
    fn model(k: usize, weight: &[f32]) -> TypedModel {
        let mut model = TypedModel::default();
        let s = model.symbols.sym("S");
        let x = model.add_source("x", f32::fact(dims![1, s, k])).unwrap();
        let rms = RmsNorm {
            axis: 2,
            eps: rctensor0(1e-5f32),
        };
        let y = model.wire_node("norm", rms, &[x]).unwrap();
        let w = model
            .add_const("w", Tensor::from_shape(&[1, 1, k], weight).unwrap())
            .unwrap();
        let z = model
            .wire_node("scale", TypedBinOp(Box::new(Mul), None), &[y[0], w])
            .unwrap();
        model.select_output_outlets(&z).unwrap();
        model
    }

    fn run(model: TypedModel, x: &[f32], s: usize, k: usize) -> Vec<f32> {
        let plan = SimplePlan::new(model).unwrap();
        let x = Tensor::from_shape(&[1, s, k], x).unwrap();
        let out = plan.run(tvec!(x.into_tvalue())).unwrap().remove(0);
        let plain = out.try_as_plain_ram().unwrap();
        plain.as_slice::<f32>().unwrap().to_vec()
    }

    #[test]
    fn fused_norm_matches_tracts_pair_over_teams() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (threads, s, k) in [
            (1, 3, 64),
            (2, 1, 576),
            (2, 37, 576),
            (3, 10, 13),
            (1, 4, 37),
        ] {
            let weight = random(&mut rng, k);
            let x = random(&mut rng, s * k);
            let want = run(model(k, &weight), &x, s, k);
            let mut ours = model(k, &weight);
            let team = (threads > 1).then(|| Arc::new(Team::new(threads)));
            install(&mut ours, team.as_ref()).unwrap();
            assert!(
                ours.nodes.iter().any(|n| n.op_is::<NormScale>())
                    && !ours.nodes.iter().any(|n| n.op_is::<RmsNorm>()),
                "fused"
            );
            let got = run(ours, &x, s, k);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{threads} threads {s}x{k}: {worst}");
        }
    }

    #[test]
    fn a_norm_without_a_constant_row_after_it_stays_tracts() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, 8])).unwrap();
        let rms = RmsNorm {
            axis: 1,
            eps: rctensor0(1e-5f32),
        };
        let y = model.wire_node("norm", rms, &[x]).unwrap();
        // multiplied by another input, not a constant
        let z = model
            .wire_node("mul", TypedBinOp(Box::new(Mul), None), &[y[0], x])
            .unwrap();
        model.select_output_outlets(&z).unwrap();
        install(&mut model, None).unwrap();
        assert!(model.nodes.iter().any(|n| n.op_is::<RmsNorm>()));
    }
}
