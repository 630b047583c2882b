//! The residual `Add` and the SwiGLU `Mul` of two f32 tensors of one shape, in place:
//! [`SameShape`] takes the place of tract's `Add` / `Mul` there when a model is loaded.
//!
//! Why: tract evaluates these through its broadcasting `ndarray` path, about 3 ns a value;
//! a 128-token prefill of SmolLM2 spent 14% of its time in the 90 of them (`fieldllmd bench
//! --profile`, Q4_0, 2 threads). Here each is one loop over two slices, written into the first
//! input when this op holds its only reference. The same IEEE operation on each pair of
//! values: the same bits as tract's.

use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::math::{Add, Mul};

/// The operation of a [`SameShape`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Arith {
    /// `a + b`
    Add,
    /// `a * b`
    Mul,
}

/// `a + b` or `a * b` of two f32 tensors of the same shape (no broadcasting).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct SameShape(pub Arith);

impl Op for SameShape {
    fn name(&self) -> StaticName {
        match self.0 {
            Arith::Add => "AddSameShape".into(),
            Arith::Mul => "MulSameShape".into(),
        }
    }
    op_as_typed_op!();
}

impl EvalOp for SameShape {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = args_2!(inputs);
        ensure!(
            a.shape() == b.shape(),
            "{}: shapes {:?} and {:?} differ",
            self.name(),
            a.shape(),
            b.shape()
        );
        ensure!(
            a.datum_type() == f32::datum_type() && b.datum_type() == f32::datum_type(),
            "{} takes f32",
            self.name()
        );
        // in place: no copy when this op holds the input's only reference
        let mut a = a.into_tensor();
        {
            let mut plain = a.try_as_plain_ram_mut()?;
            let b = b.try_as_plain_ram()?;
            let (a, b) = (plain.as_slice_mut::<f32>()?, b.as_slice::<f32>()?);
            match self.0 {
                Arith::Add => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
                Arith::Mul => a.iter_mut().zip(b).for_each(|(a, b)| *a *= b),
            }
        }
        Ok(tvec!(a.into_tvalue()))
    }
}

impl TypedOp for SameShape {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "{} takes two inputs", self.name());
        ensure!(
            inputs[0].datum_type == f32::datum_type() && inputs[1].datum_type == f32::datum_type(),
            "{} takes f32",
            self.name()
        );
        ensure!(
            inputs[0].shape == inputs[1].shape,
            "{}: shapes {:?} and {:?} differ",
            self.name(),
            inputs[0].shape,
            inputs[1].shape
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// Puts a [`SameShape`] in place of every tract `Add` and `Mul` of an optimized model whose
/// inputs and output are f32 of one shape (the facts say so: the same dimensions, symbols
/// included).
pub fn install(model: &mut TypedModel) -> TractResult<()> {
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(bin) = node.op_as::<TypedBinOp>() else {
            continue;
        };
        let arith = if bin.0.is::<Add>() {
            Arith::Add
        } else if bin.0.is::<Mul>() {
            Arith::Mul
        } else {
            continue;
        };
        let f32_ = f32::datum_type();
        let [a, b] = [node.inputs[0], node.inputs[1]].map(|i| model.outlet_fact(i));
        let (a, b, out) = (a?, b?, model.outlet_fact(OutletId::new(id, 0))?);
        let fits = [a, b, out].iter().all(|f| f.datum_type == f32_)
            && a.shape == b.shape
            && a.shape == out.shape
            && a.konst.is_none()
            && b.konst.is_none();
        if fits {
            model.nodes[id].op = Box::new(SameShape(arith));
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
            .map(|_| f32::from_bits(rng.next_u32() & 0xbfff_ffff)) // finite, any magnitude below 2
            .collect();
        Tensor::from_shape(shape, &v).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let p = t.try_as_plain_ram().unwrap();
        let v = p.as_slice::<f32>().unwrap();
        v.iter().map(|v| v.to_bits()).collect()
    }

    fn run(op: &dyn EvalOp, a: &Tensor, b: &Tensor) -> TractResult<Tensor> {
        let inputs = tvec!(a.clone().into_tvalue(), b.clone().into_tvalue());
        Ok(op
            .eval(&EvalContext::out_of_plan(), inputs)?
            .remove(0)
            .into_tensor())
    }

    #[test]
    fn same_bits_as_tracts_add_and_mul() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for shape in [vec![1, 7, 576], vec![1, 1, 1536], vec![3], vec![2, 0, 4]] {
            let (a, b) = (random(&mut rng, &shape), random(&mut rng, &shape));
            for (arith, theirs) in [
                (Arith::Add, TypedBinOp(Box::new(Add), None)),
                (Arith::Mul, TypedBinOp(Box::new(Mul), None)),
            ] {
                let want = run(&theirs, &a, &b).unwrap();
                let got = run(&SameShape(arith), &a, &b).unwrap();
                assert_eq!(got.shape(), want.shape());
                assert_eq!(bits(&got), bits(&want), "{arith:?} {shape:?}");
            }
        }
    }

    #[test]
    fn different_shapes_or_types_are_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let a = random(&mut rng, &[1, 4, 8]);
        let b = random(&mut rng, &[1, 1, 8]);
        let err = run(&SameShape(Arith::Add), &a, &b).unwrap_err();
        assert!(err.to_string().contains("differ"), "{err}");
        let ints = Tensor::from_shape(&[1, 4, 8], &[1i32; 32]).unwrap();
        assert!(run(&SameShape(Arith::Mul), &ints, &ints).is_err());
    }

    #[test]
    fn install_takes_same_shape_f32_pairs_only() {
        let mut model = TypedModel::default();
        let s = model.symbols.sym("S");
        let fact = f32::fact(dims![1, s, 8]);
        let a = model.add_source("a", fact.clone()).unwrap();
        let b = model.add_source("b", fact).unwrap();
        let row = model.add_source("row", f32::fact(dims![1, 1, 8])).unwrap();
        let add = model
            .wire_node("add", TypedBinOp(Box::new(Add), None), &[a, b])
            .unwrap();
        let mul = model
            .wire_node("mul", TypedBinOp(Box::new(Mul), None), &[add[0], row])
            .unwrap();
        model.select_output_outlets(&mul).unwrap();
        install(&mut model).unwrap();
        assert!(model.node(add[0].node).op_is::<SameShape>());
        // broadcasting stays tract's
        assert!(model.node(mul[0].node).op_is::<TypedBinOp>());
    }
}
