//! The tract side: [`GgmlMatMul`] and [`GgmlGather`] ops over weight planes held as graph
//! constants, their NNEF form (extension `fieldllm`), and the import transform that puts them
//! in place of the f32 products of an ONNX package using the package's GGUF blocks.
//!
//! The planes are ordinary constants (u8 values, f32 scales), so tract saves and loads them as
//! NNEF tensors and nothing outside this module knows the format. One set of planes can feed
//! several ops: the tied embedding and LM head share theirs.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::array::Gather;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::konst::Const;
use tract_nnef::internal as nnef;

use super::kernel::{Isa, Out, gemm_into};
use super::team::{Team, split_rows};
use super::{BLOCK, BlockKind, OwnedWeights, QuantizedActs, Weights};

/// `y[..., n] = x[..., k] . w[n, k]` with `w` in planes (inputs: x, qs, d, and m for Q4_1).
#[derive(Clone, Debug)]
pub struct GgmlMatMul {
    /// Weight block type.
    pub kind: BlockKind,
    /// Threads that split the rows; set after loading (none: this thread only).
    pub team: Option<Arc<Team>>,
}

impl PartialEq for GgmlMatMul {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
    }
}

impl Eq for GgmlMatMul {}

/// `y[ids..., k] = w[id, :]` dequantized (inputs: ids, qs, d, and m for Q4_1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgmlGather {
    /// Weight block type.
    pub kind: BlockKind,
}

fn planes(kind: BlockKind) -> usize {
    if kind == BlockKind::Q4_1 { 3 } else { 2 }
}

/// `(n, k)` from the value plane's fact `[n, k / 32 * qs_bytes]`.
fn shape_of(kind: BlockKind, qs: &TypedFact) -> TractResult<(usize, usize)> {
    let s = qs
        .shape
        .as_concrete()
        .context("weight planes have a fixed shape")?;
    ensure!(s.len() == 2, "value plane must be [n, bytes], got {s:?}");
    Ok((s[0], s[1] / kind.qs_bytes() * BLOCK))
}

fn weights<'a>(kind: BlockKind, inputs: &'a [TValue]) -> TractResult<Weights<'a>> {
    let qs = inputs[0].try_as_plain_ram()?.as_slice::<u8>()?;
    let d = inputs[1].try_as_plain_ram()?.as_slice::<f32>()?;
    let m: &[f32] = if kind == BlockKind::Q4_1 {
        inputs[2].try_as_plain_ram()?.as_slice::<f32>()?
    } else {
        &[]
    };
    let shape = inputs[0].shape();
    ensure!(shape.len() == 2, "value plane must be [n, bytes]");
    let (n, k) = (shape[0], shape[1] / kind.qs_bytes() * BLOCK);
    Weights::new(kind, n, k, qs, d, m).map_err(|e| anyhow!(e))
}

thread_local! {
    // activations of the op this thread is evaluating: reused, so a decode step allocates none
    static ACTS: std::cell::RefCell<QuantizedActs> = std::cell::RefCell::default();
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
        ensure!(inputs.len() == 1 + planes(self.kind), "GgmlMatMul inputs");
        let w = weights(self.kind, &inputs[1..])?;
        let x = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let xs = inputs[0].shape();
        ensure!(
            xs.last() == Some(&w.k),
            "input {xs:?} does not end with k = {}",
            w.k
        );
        let rows = x.len() / w.k;
        let mut shape: TVec<usize> = xs.into();
        *shape.last_mut().unwrap() = w.n;
        let mut y = Tensor::zero::<f32>(&shape)?;
        ACTS.with_borrow_mut(|acts| {
            acts.quantize(x, rows, w.k);
            let mut plain = y.try_as_plain_ram_mut()?;
            let out = Out::new(plain.as_slice_mut::<f32>()?, rows, w.n);
            let isa = Isa::best();
            let acts = &*acts;
            match &self.team {
                Some(team) if team.threads() > 1 && w.n >= 64 => {
                    let parts: Vec<_> = split_rows(w.n, team.threads(), 4).collect();
                    // Safety: each part writes its own rows' columns of `y`, alive until run
                    // returns
                    team.run(&|p| unsafe { gemm_into(isa, &w, parts[p].clone(), acts, out) });
                }
                // Safety: this thread writes all of `y`
                _ => unsafe { gemm_into(isa, &w, 0..w.n, acts, out) },
            }
            TractResult::Ok(())
        })?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for GgmlMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + planes(self.kind), "GgmlMatMul inputs");
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "GgmlMatMul takes f32"
        );
        let (n, k) = shape_of(self.kind, inputs[1])?;
        let mut shape = inputs[0].shape.to_tvec();
        ensure!(
            shape.last() == Some(&k.to_dim()),
            "input {:?} does not end with k = {k}",
            inputs[0].shape
        );
        *shape.last_mut().unwrap() = n.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let (n, k) = shape_of(self.kind, inputs[1])?;
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
        ensure!(inputs.len() == 1 + planes(self.kind), "GgmlGather inputs");
        let w = weights(self.kind, &inputs[1..])?;
        let ids = inputs[0].cast_to::<i64>()?;
        let ids = ids.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
        let mut shape: TVec<usize> = inputs[0].shape().into();
        shape.push(w.k);
        let mut y = Tensor::zero::<f32>(&shape)?;
        let mut plain = y.try_as_plain_ram_mut()?;
        let out = plain.as_slice_mut::<f32>()?;
        for (row, &id) in out.chunks_exact_mut(w.k).zip(&ids) {
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
        ensure!(inputs.len() == 1 + planes(self.kind), "GgmlGather inputs");
        let (_, k) = shape_of(self.kind, inputs[1])?;
        let mut shape = inputs[0].shape.to_tvec();
        shape.push(k.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// The NNEF extension `fieldllm`: `fieldllm_matmul_q4_1(input, qs, d, m)`,
/// `fieldllm_matmul_q8_0(input, qs, d)`, and `fieldllm_gather_*` likewise.
pub fn registry() -> nnef::Registry {
    let mut reg = nnef::Registry::new("fieldllm")
        .with_doc("Extension `fieldllm`: matrix products and lookups on GGUF weight blocks");
    for kind in [BlockKind::Q4_1, BlockKind::Q8_0] {
        let mut params = vec![
            nnef::TypeName::Scalar.tensor().named("input"),
            nnef::TypeName::Scalar.tensor().named("qs"),
            nnef::TypeName::Scalar.tensor().named("d"),
        ];
        if kind == BlockKind::Q4_1 {
            params.push(nnef::TypeName::Scalar.tensor().named("m"));
        }
        let lower = kind.name().to_lowercase();
        let (mm, ga): (nnef::ToTract, nnef::ToTract) = match kind {
            BlockKind::Q4_1 => (
                |b, i| deser(b, i, BlockKind::Q4_1, false),
                |b, i| deser(b, i, BlockKind::Q4_1, true),
            ),
            BlockKind::Q8_0 => (
                |b, i| deser(b, i, BlockKind::Q8_0, false),
                |b, i| deser(b, i, BlockKind::Q8_0, true),
            ),
        };
        let out = [("output", nnef::TypeName::Scalar.tensor())];
        reg.register_primitive(&format!("fieldllm_matmul_{lower}"), &params, &out, mm);
        reg.register_primitive(&format!("fieldllm_gather_{lower}"), &params, &out, ga);
    }
    reg.register_dumper(|ast, node, op: &GgmlMatMul| {
        let inputs: Vec<_> = node.inputs.iter().map(|i| ast.mapping[i].clone()).collect();
        let prim = format!("fieldllm_matmul_{}", op.kind.name().to_lowercase());
        Ok(Some(nnef::invocation(&prim, &inputs, &[])))
    });
    reg.register_dumper(|ast, node, op: &GgmlGather| {
        let inputs: Vec<_> = node.inputs.iter().map(|i| ast.mapping[i].clone()).collect();
        let prim = format!("fieldllm_gather_{}", op.kind.name().to_lowercase());
        Ok(Some(nnef::invocation(&prim, &inputs, &[])))
    });
    reg
}

fn deser(
    builder: &mut nnef::ModelBuilder<'_>,
    invocation: &nnef::ResolvedInvocation<'_>,
    kind: BlockKind,
    gather: bool,
) -> TractResult<nnef::Value> {
    let names = ["input", "qs", "d", "m"];
    let inputs = names[..1 + planes(kind)]
        .iter()
        .map(|n| invocation.named_arg_as(builder, n))
        .collect::<TractResult<TVec<OutletId>>>()?;
    if gather {
        builder.wire(GgmlGather { kind }, &inputs)
    } else {
        builder.wire(GgmlMatMul { kind, team: None }, &inputs)
    }
}

/// Gives every [`GgmlMatMul`] of a loaded model the same team of `threads`.
pub fn install_team(model: &mut TypedModel, threads: usize) {
    let team = (threads > 1).then(|| Arc::new(Team::new(threads)));
    for node in &mut model.nodes {
        if let Some(op) = node.op_as_mut::<GgmlMatMul>() {
            op.team = team.clone();
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

/// One weight of the package, in GGUF blocks, and the graph constant it replaces.
pub struct BlockTensor {
    /// The constant's node name in the ONNX graph.
    pub name: String,
    /// Identifies the bytes: tensors with the same key share one set of planes.
    pub key: u64,
    /// The weight, `[n out, k in]`.
    pub weights: Arc<OwnedWeights>,
}

/// Replaces every product with (and lookup in) a named constant by the ops above, after
/// checking that the constant is exactly the blocks dequantized. `model` is decluttered.
pub fn install_blocks(model: &mut TypedModel, tensors: &[BlockTensor]) -> TractResult<()> {
    let mut planes_of: HashMap<u64, TVec<OutletId>> = HashMap::new();
    for t in tensors {
        let w = &t.weights;
        // tract names a typed ONNX initializer after its outlet: "name.0"
        let const_id = model
            .node_id_by_name(&t.name)
            .or_else(|_| model.node_id_by_name(&format!("{}.0", t.name)))
            .with_context(|| format!("the graph has no constant {:?}", t.name))?;
        let konst = model
            .node(const_id)
            .op_as::<Const>()
            .with_context(|| format!("{:?} is not a constant", t.name))?
            .val()
            .clone();
        let consumers: Vec<InletId> = model.outlet_successors(OutletId::new(const_id, 0)).to_vec();
        ensure!(!consumers.is_empty(), "constant {:?} is unused", t.name);
        if !planes_of.contains_key(&t.key) {
            let mut outlets = tvec![];
            let nb = w.k / BLOCK;
            outlets.push(model.add_const(
                format!("{}.qs", t.name),
                Tensor::from_shape(&[w.n, nb * w.kind.qs_bytes()], &w.qs)?,
            )?);
            outlets.push(model.add_const(
                format!("{}.d", t.name),
                Tensor::from_shape(&[w.n, nb], &w.d)?,
            )?);
            if w.kind == BlockKind::Q4_1 {
                outlets.push(model.add_const(
                    format!("{}.m", t.name),
                    Tensor::from_shape(&[w.n, nb], &w.m)?,
                )?);
            }
            planes_of.insert(t.key, outlets);
        }
        let planes = planes_of[&t.key].clone();
        for inlet in consumers {
            let node = model.node(inlet.node).clone();
            let mut patch = TypedModelPatch::default();
            let mut taps = tvec![];
            let op: Box<dyn TypedOp> = if let Some(es) = node.op_as::<EinSum>() {
                ensure!(
                    inlet.slot == 1,
                    "{}: weight {:?} is not the right operand",
                    node.name,
                    t.name
                );
                check_xw(&es.axes.to_string(), &node.name)?;
                check_equal(&konst, w, true, &t.name)?;
                taps.push(patch.tap_model(model, node.inputs[0])?);
                Box::new(GgmlMatMul {
                    kind: w.kind,
                    team: None,
                })
            } else if let Some(g) = node.op_as::<Gather>() {
                ensure!(
                    inlet.slot == 0 && g.axis == 0,
                    "{}: not a row lookup in {:?}",
                    node.name,
                    t.name
                );
                check_equal(&konst, w, false, &t.name)?;
                taps.push(patch.tap_model(model, node.inputs[1])?);
                Box::new(GgmlGather { kind: w.kind })
            } else {
                bail!(
                    "{}: {} on {:?} has no block-quantized form",
                    node.name,
                    node.op.name(),
                    t.name
                );
            };
            for p in &planes {
                taps.push(patch.tap_model(model, *p)?);
            }
            let out = patch.wire_node(&node.name, op, &taps)?;
            patch.shunt_outside(model, node.id.into(), out[0])?;
            patch.apply(model)?;
        }
    }
    Ok(())
}

/// The product must be `x[..., k] @ w[k, n]`: the weight's first axis summed over, its second
/// the output's last.
fn check_xw(axes: &str, node: &str) -> TractResult<()> {
    let parse = || -> Option<bool> {
        let (ins, out) = axes.split_once("->")?;
        let (x, w) = ins.split_once(',')?;
        let (x, w, out): (Vec<char>, Vec<char>, Vec<char>) = (
            x.chars().collect(),
            w.chars().collect(),
            out.chars().collect(),
        );
        Some(
            w.len() == 2
                && x.last() == Some(&w[0])
                && !out.contains(&w[0])
                && out.last() == Some(&w[1])
                && out[..out.len() - 1] == x[..x.len() - 1],
        )
    };
    ensure!(
        parse() == Some(true),
        "{node}: product {axes} is not x[..., k] @ w[k, n]"
    );
    Ok(())
}

/// The ONNX constant (f32, `[k, n]` for a product, `[n, k]` for a lookup) must equal the
/// dequantized blocks exactly: the converter made it from the same blocks.
fn check_equal(konst: &Tensor, w: &OwnedWeights, transposed: bool, name: &str) -> TractResult<()> {
    let c = konst.cast_to::<f32>()?;
    let c = c.try_as_plain_ram()?.as_slice::<f32>()?;
    let want_shape = if transposed { [w.k, w.n] } else { [w.n, w.k] };
    ensure!(
        konst.shape() == want_shape,
        "{name}: constant is {:?}, blocks make {want_shape:?}",
        konst.shape()
    );
    let view = w.view();
    let mut row = vec![0f32; w.k];
    for r in 0..w.n {
        view.dequantize_row(r, &mut row);
        for (kk, v) in row.iter().enumerate() {
            let got = if transposed {
                c[kk * w.n + r]
            } else {
                c[r * w.k + kk]
            };
            ensure!(
                got.to_bits() == v.to_bits(),
                "{name}: the graph's weight [{r}, {kk}] is {got}, its GGUF block gives {v}: \
                 the package's blocks and graph disagree"
            );
        }
    }
    Ok(())
}
