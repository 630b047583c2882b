//! The residual `Add` and the SwiGLU `Mul` of two f32 tensors of one shape, in place:
//! [`SameShape`] takes the place of tract's `Add` / `Mul` there when a model is loaded, and
//! [`SwiGlu`] of a `Silu` and the `Mul` after it.
//!
//! Why: tract evaluates these through its broadcasting `ndarray` path, about 3 ns a value;
//! a 128-token prefill of SmolLM2 spent 14% of its time in the 90 of them (`fieldllmd bench
//! --profile`, Q4_0, 2 threads). Here each is one loop over two slices, written into the first
//! input when this op holds its only reference. The same IEEE operation on each pair of
//! values: the same bits as tract's.

use std::sync::{Arc, Mutex, PoisonError};

use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::math::{Add, Mul};
use tract_core::ops::nn::Silu;
use tract_linalg::routines::Func;

use crate::cpu::{Team, part_of};

/// Values from which a [`SwiGlu`] splits over the team (a decode step's 1536 stay on the
/// caller: waking the team costs about what they take).
const SHARE_FROM_VALUES: usize = 8192;

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

/// `silu(gate) * up` of two f32 tensors of one shape, in place on `gate`: tract's own Silu
/// kernel, then the product, each part of the values on one of the team's threads. The same
/// bits as tract's `Silu` and `Mul` (the kernel works value by value).
#[derive(Clone, Debug)]
pub struct SwiGlu {
    /// Threads that split the values; none: this thread only.
    pub team: Option<Arc<Team>>,
}

impl PartialEq for SwiGlu {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SwiGlu {}

impl std::hash::Hash for SwiGlu {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl Op for SwiGlu {
    fn name(&self) -> StaticName {
        "SwiGlu".into()
    }
    op_as_typed_op!();
}

impl EvalOp for SwiGlu {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (gate, up) = args_2!(inputs);
        ensure!(
            gate.shape() == up.shape()
                && gate.datum_type() == f32::datum_type()
                && up.datum_type() == f32::datum_type(),
            "SwiGlu takes two f32 tensors of one shape: {:?} and {:?}",
            gate.shape(),
            up.shape()
        );
        let silu = Func::Silu.ew_f32()?;
        let mut gate = gate.into_tensor();
        {
            let mut plain = gate.try_as_plain_ram_mut()?;
            let up = up.try_as_plain_ram()?;
            let (g, u) = (plain.as_slice_mut::<f32>()?, up.as_slice::<f32>()?);
            let threads = match &self.team {
                Some(t) if g.len() >= SHARE_FROM_VALUES => t.threads(),
                _ => 1,
            };
            // parts in whole cache lines of values
            let (n, mut rest) = (g.len(), g);
            let mut parts = Vec::with_capacity(threads);
            for p in 0..threads {
                let r = part_of(n, threads, 16, p);
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
                parts.push(Mutex::new((mine, &u[r])));
                rest = tail;
            }
            let failed = Mutex::new(None);
            let job = |p: usize| {
                let Some(part) = parts.get(p) else { return };
                let mut part = part.lock().unwrap_or_else(PoisonError::into_inner);
                let (g, u) = &mut *part;
                if let Err(e) = silu.run(g) {
                    *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    return;
                }
                g.iter_mut().zip(u.iter()).for_each(|(g, u)| *g *= u);
            };
            match &self.team {
                Some(team) if threads > 1 => team.run(&job),
                _ => job(0),
            }
            if let Some(e) = failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
                return Err(e);
            }
        }
        Ok(tvec!(gate.into_tvalue()))
    }
}

impl TypedOp for SwiGlu {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "SwiGlu takes gate and up");
        ensure!(
            inputs.iter().all(|f| f.datum_type == f32::datum_type())
                && inputs[0].shape == inputs[1].shape,
            "SwiGlu takes two f32 tensors of one shape"
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// Whether `node` is a tract `Add` / `Mul` of two non-constant f32 inputs of the output's shape.
fn same_shape_arith(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Arith>> {
    let Some(bin) = node.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    let arith = if bin.0.is::<Add>() {
        Arith::Add
    } else if bin.0.is::<Mul>() {
        Arith::Mul
    } else {
        return Ok(None);
    };
    let f32_ = f32::datum_type();
    let (a, b) = (
        model.outlet_fact(node.inputs[0])?,
        model.outlet_fact(node.inputs[1])?,
    );
    let out = model.outlet_fact(OutletId::new(node.id, 0))?;
    let fits = [a, b, out].iter().all(|f| f.datum_type == f32_)
        && a.shape == b.shape
        && a.shape == out.shape
        && a.konst.is_none()
        && b.konst.is_none();
    Ok(fits.then_some(arith))
}

/// Fuses `Mul(Silu(gate), up)` (either order, the `Silu` used by the `Mul` alone) into a
/// [`SwiGlu`]; returns how many.
fn install_swiglu(model: &mut TypedModel, team: Option<&Arc<Team>>) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes.len() {
        let mul = model.nodes[id].clone();
        if same_shape_arith(model, &mul)? != Some(Arith::Mul) {
            continue;
        }
        let is_silu = |o: OutletId| {
            let n = model.node(o.node);
            n.op_as::<ElementWiseOp>().is_some_and(|e| e.0.is::<Silu>())
                && model.outlet_successors(o).len() == 1
        };
        let (silu, up) = if is_silu(mul.inputs[0]) {
            (mul.inputs[0], mul.inputs[1])
        } else if is_silu(mul.inputs[1]) {
            (mul.inputs[1], mul.inputs[0])
        } else {
            continue;
        };
        let gate = model.node(silu.node).inputs[0];
        let mut patch = TypedModelPatch::default();
        let inputs = patch.taps(model, &[gate, up])?;
        let op = SwiGlu {
            team: team.cloned(),
        };
        let out = patch.wire_node(&mul.name, op, &inputs)?;
        patch.shunt_outside(model, OutletId::new(id, 0), out[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

/// Fuses every `Silu`-then-`Mul` into a [`SwiGlu`] sharing `team`, then puts a [`SameShape`]
/// in place of every other tract `Add` and `Mul` of an optimized model whose inputs and output
/// are f32 of one shape (the facts say so: the same dimensions, symbols included).
pub fn install(model: &mut TypedModel, team: Option<&Arc<Team>>) -> TractResult<()> {
    if install_swiglu(model, team)? > 0 {
        model.compact()?;
    }
    for id in 0..model.nodes.len() {
        if let Some(arith) = same_shape_arith(model, &model.nodes[id])? {
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
        install(&mut model, None).unwrap();
        assert!(model.node(add[0].node).op_is::<SameShape>());
        // broadcasting stays tract's
        assert!(model.node(mul[0].node).op_is::<TypedBinOp>());
    }

    #[test]
    fn swiglu_is_tracts_silu_then_mul_to_the_bit_over_teams() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (threads, shape) in [
            (1, vec![1, 3, 40]),
            (2, vec![1, 7, 1536]),
            (3, vec![2, 5, 1000]),
        ] {
            let (g, u) = (random(&mut rng, &shape), random(&mut rng, &shape));
            let mut model = TypedModel::default();
            let a = model.add_source("g", f32::fact(&shape)).unwrap();
            let b = model.add_source("u", f32::fact(&shape)).unwrap();
            let s = model
                .wire_node("silu", ElementWiseOp(Box::new(Silu {}), None), &[a])
                .unwrap();
            let m = model
                .wire_node("mul", TypedBinOp(Box::new(Mul), None), &[b, s[0]])
                .unwrap();
            model.select_output_outlets(&m).unwrap();
            let inputs = || tvec!(g.clone().into_tvalue(), u.clone().into_tvalue());
            let want = SimplePlan::new(model.clone())
                .unwrap()
                .run(inputs())
                .unwrap();
            let team = (threads > 1).then(|| Arc::new(Team::new(threads)));
            install(&mut model, team.as_ref()).unwrap();
            assert!(model.nodes.iter().any(|n| n.op_is::<SwiGlu>()), "fused");
            assert!(
                !model.nodes.iter().any(|n| n.op_is::<ElementWiseOp>()),
                "silu gone"
            );
            let got = SimplePlan::new(model).unwrap().run(inputs()).unwrap();
            assert_eq!(bits(&got[0]), bits(&want[0]), "{threads} threads {shape:?}");
        }
    }
}
