//! Rotary position embedding in one pass: [`Rotary`] takes the place of tract's `ApplyRope`
//! in a loaded model (the Rust GGUF import writes `ApplyRope`, so artifacts stay tract's own).
//!
//! `ApplyRope` evaluates `x * cos + rotate_half(x) * sin` as four tract ops, each allocating
//! its output and broadcasting the tables: 60 calls a token cost SmolLM2 about 5% of a prefill
//! and 3.5% of a decode step (`fieldllmd bench --profile`). This op computes the same f32
//! operations, in the same order, in place on its input: the same bits, in one pass.

use tract_core::internal::*;
use tract_transformers::ops::apply_rope::ApplyRope;

/// `x * cos + [-x2, x1] * sin` over the last axis (`x1`, `x2` its halves), as tract's
/// `ApplyRope`: `x` is `[..., heads, hd]` f32; `cos` and `sin` the same shape, or with one
/// head (`[..., 1, hd]`) that every head shares.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Rotary;

impl Op for Rotary {
    fn name(&self) -> StaticName {
        "Rotary".into()
    }
    op_as_typed_op!();
}

impl EvalOp for Rotary {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, cos, sin) = args_3!(inputs);
        // in place: no copy when this op holds the input's only reference
        let mut x = x.into_tensor();
        rotate(&mut x, &cos, &sin)?;
        Ok(tvec!(x.into_tvalue()))
    }
}

impl TypedOp for Rotary {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "Rotary takes x, cos, sin");
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "Rotary takes f32"
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// Rotates `x` in place (see [`Rotary`]).
fn rotate(x: &mut Tensor, cos: &Tensor, sin: &Tensor) -> TractResult<()> {
    let shape: TVec<usize> = x.shape().into();
    let r = shape.len();
    ensure!(r >= 2, "Rotary: x {shape:?} has no head axis");
    let (heads, hd) = (shape[r - 2], shape[r - 1]);
    let table = cos.shape();
    ensure!(
        table == sin.shape()
            && table.len() == r
            && table[..r - 2] == shape[..r - 2]
            && (table[r - 2] == 1 || table[r - 2] == heads)
            && table[r - 1] == hd
            && hd % 2 == 0,
        "Rotary: tables {table:?} / {:?} do not fit x {shape:?}",
        sin.shape()
    );
    let shared = table[r - 2] == 1 && heads > 1;
    let (cos, sin) = (
        cos.try_as_plain_ram()?.as_slice::<f32>()?,
        sin.try_as_plain_ram()?.as_slice::<f32>()?,
    );
    let mut plain = x.try_as_plain_ram_mut()?;
    let half = hd / 2;
    for (i, v) in plain
        .as_slice_mut::<f32>()?
        .chunks_exact_mut(hd)
        .enumerate()
    {
        let t = if shared { i / heads } else { i } * hd;
        let (c, s) = (&cos[t..t + hd], &sin[t..t + hd]);
        let (x1, x2) = v.split_at_mut(half);
        for j in 0..half {
            let (a, b) = (x1[j], x2[j]);
            // ApplyRope's operations: x * cos, then rotate_half(x) * sin (with -x2 negated
            // first), then the sum
            x1[j] = a * c[j] + -b * s[j];
            x2[j] = b * c[half + j] + a * s[half + j];
        }
    }
    Ok(())
}

/// Puts a [`Rotary`] in place of every f32 `ApplyRope` of an optimized model (same inputs,
/// same output).
pub fn install(model: &mut TypedModel) -> TractResult<()> {
    for id in 0..model.nodes.len() {
        if !model.nodes[id].op_is::<ApplyRope>() {
            continue;
        }
        if model.outlet_fact(OutletId::new(id, 0))?.datum_type == f32::datum_type() {
            model.nodes[id].op = Box::new(Rotary);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rng.next_u32() as f32 / u32::MAX as f32 * 4.0 - 2.0)
            .collect();
        Tensor::from_shape(shape, &v).unwrap()
    }

    fn run(op: &dyn EvalOp, x: &Tensor, cos: &Tensor, sin: &Tensor) -> TractResult<Tensor> {
        let inputs = tvec!(x.clone().into(), cos.clone().into(), sin.clone().into());
        Ok(op
            .eval(&EvalContext::out_of_plan(), inputs)?
            .remove(0)
            .into_tensor())
    }

    #[test]
    fn same_bits_as_apply_rope() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // prefill and decode shapes, tables shared by the heads or per head
        for (x, t) in [
            (vec![1, 7, 3, 64], vec![1, 7, 1, 64]),
            (vec![1, 1, 9, 64], vec![1, 1, 1, 64]),
            (vec![2, 5, 4, 6], vec![2, 5, 4, 6]),
            (vec![3, 2], vec![1, 2]),
        ] {
            let x = random(&mut rng, &x);
            let (cos, sin) = (random(&mut rng, &t), random(&mut rng, &t));
            let want = run(&ApplyRope, &x, &cos, &sin).unwrap();
            let got = run(&Rotary, &x, &cos, &sin).unwrap();
            assert_eq!(got.shape(), want.shape());
            let bits = |t: &Tensor| -> Vec<u32> {
                let p = t.try_as_plain_ram().unwrap();
                p.as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(&got), bits(&want), "x {:?}", x.shape());
        }
    }

    #[test]
    fn tables_that_do_not_fit_are_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x = random(&mut rng, &[1, 4, 2, 8]);
        for t in [
            vec![1, 3, 1, 8],
            vec![1, 4, 1, 6],
            vec![1, 4, 3, 8],
            vec![4, 1, 8],
        ] {
            let table = random(&mut rng, &t);
            let err = run(&Rotary, &x, &table, &table).unwrap_err();
            assert!(err.to_string().contains("do not fit"), "{t:?}: {err}");
        }
        let odd = random(&mut rng, &[1, 1, 2, 5]);
        let table = random(&mut rng, &[1, 1, 1, 5]);
        assert!(run(&Rotary, &odd, &table, &table).is_err());
    }
}
