//! The import transform: every product with (and lookup in) one of the package's weights
//! becomes a block op on the packed GGUF blocks, once the f32 constant is checked to be
//! exactly those blocks dequantized.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::array::Gather;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::konst::Const;

use super::{GgmlGather, GgmlMatMul};
use crate::cpu::Isa;
use crate::ggml::packed::{GROUP, Packed, group_block_bytes, pack};
use crate::ggml::{BLOCK, OwnedWeights, QuantizedActs};

/// One weight of the package, in GGUF blocks, and the graph constant it replaces.
pub struct BlockTensor {
    /// The constant's node name in the ONNX graph.
    pub name: String,
    /// Identifies the bytes: tensors with the same key share one packed constant.
    pub key: u64,
    /// The weight, `[n out, k in]`.
    pub weights: Arc<OwnedWeights>,
    /// Products with it take their activations to 15 bits (see [`GgmlMatMul::precise`]).
    pub precise: bool,
}

/// Replaces every product with (and lookup in) a named constant by the ops above, after
/// checking that the constant is exactly the blocks dequantized. `model` is decluttered.
pub fn install_blocks(model: &mut TypedModel, tensors: &[BlockTensor]) -> TractResult<()> {
    let mut packed_of: HashMap<u64, OutletId> = HashMap::new();
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
        let packed = match packed_of.get(&t.key) {
            Some(p) => *p,
            None => {
                let shape = [w.n.div_ceil(GROUP), w.k / BLOCK, group_block_bytes(w.kind)];
                let bytes = pack(w);
                check_product(w, &bytes, &t.name)?;
                let packed = Tensor::from_shape(&shape, &bytes)?;
                let outlet = model.add_const(format!("{}.packed", t.name), packed)?;
                packed_of.insert(t.key, outlet);
                outlet
            }
        };
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
                    n: w.n,
                    precise: t.precise,
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
                Box::new(GgmlGather {
                    kind: w.kind,
                    n: w.n,
                })
            } else {
                bail!(
                    "{}: {} on {:?} has no block-quantized form",
                    node.name,
                    node.op.name(),
                    t.name
                );
            };
            taps.push(patch.tap_model(model, packed)?);
            let out = patch.wire_node(&node.name, op, &taps)?;
            patch.shunt_outside(model, node.id.into(), out[0])?;
            patch.apply(model)?;
        }
    }
    Ok(())
}

/// The packed weights times a fixed activation row, through the kernels this CPU runs, must
/// match the f32 product of the dequantized weights within what 8-bit activations cost.
pub(crate) fn check_product(w: &OwnedWeights, bytes: &[u8], name: &str) -> TractResult<()> {
    let x: Vec<f32> = (0..w.k)
        .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * (1.0 + (i % 7) as f32))
        .collect();
    let mut acts = QuantizedActs::default();
    acts.quantize(&x, 1, w.k);
    let p = Packed::new(w.kind, w.n, w.k, bytes).map_err(|e| anyhow!(e))?;
    let mut got = vec![0f32; w.n];
    crate::ggml::kernel::gemm(Isa::best(), &p, &acts, &mut got);
    let mut row = vec![0f32; w.k];
    for (r, got) in got.iter().enumerate() {
        w.view().dequantize_row(r, &mut row);
        let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
        let scale: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        ensure!(
            (got - want).abs() <= 0.02 * scale + 1e-6,
            "{name}: row {r}: kernel {} gives {got}, f32 {want}",
            Isa::best().name(),
        );
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ggml::BlockKind;
    use crate::ggml::op::uses_blocks;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    fn random_weights(kind: BlockKind, n: usize, k: usize, seed: u64) -> OwnedWeights {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        for _ in 0..n * k / BLOCK {
            bytes.extend(f16::from_f32(0.01 + (rng.next_u32() % 100) as f32 * 1e-4).to_le_bytes());
            if kind == BlockKind::Q4_1 {
                bytes.extend(f16::from_f32(-((rng.next_u32() % 100) as f32) * 1e-3).to_le_bytes());
            }
            for _ in 0..kind.qs_bytes() {
                bytes.push((rng.next_u32() % 255) as u8);
            }
        }
        OwnedWeights::from_gguf(kind, n, k, &bytes).unwrap()
    }

    /// x @ W and W[ids] in f32 against the same graph after `install_blocks`, with 8-bit and
    /// with 15-bit (precise) activations.
    #[test]
    fn installed_ops_compute_what_the_f32_graph_did() {
        let cases = [BlockKind::Q4_1, BlockKind::Q8_0].map(|k| [(k, false), (k, true)]);
        for (kind, precise) in cases.into_iter().flatten() {
            let (n, k) = (200, 576);
            let w = Arc::new(random_weights(kind, n, k, 7));
            let mut dense = vec![0f32; n * k];
            for r in 0..n {
                w.view().dequantize_row(r, &mut dense[r * k..(r + 1) * k]);
            }
            let wt: Vec<f32> = (0..k * n).map(|i| dense[(i % n) * k + i / n]).collect();
            let mut model = TypedModel::default();
            let ids = model.add_source("ids", i64::fact([1, 37])).unwrap();
            let table = model
                .add_const("table", Tensor::from_shape(&[n, k], &dense).unwrap())
                .unwrap();
            let x = model
                .wire_node("lookup", Gather::new(0), &[table, ids])
                .unwrap()[0];
            let wk = model
                .add_const("wk", Tensor::from_shape(&[k, n], &wt).unwrap())
                .unwrap();
            let y = model
                .wire_node(
                    "mm",
                    EinSum::new("abk,kn->abn".parse().unwrap(), f32::datum_type()),
                    &[x, wk],
                )
                .unwrap();
            model.select_output_outlets(&y).unwrap();
            let ids: Vec<i64> = (0..37).map(|i| (i * 7 % 200) as i64).collect();
            let input = Tensor::from_shape(&[1, 37], &ids).unwrap();
            let run = |m: TypedModel| {
                m.into_runnable()
                    .unwrap()
                    .run(tvec!(input.clone().into_tvalue()))
                    .unwrap()[0]
                    .clone()
                    .into_tensor()
            };
            let want = run(model.clone());
            let tensors = [
                BlockTensor {
                    name: "table".into(),
                    key: 0,
                    weights: w.clone(),
                    precise,
                },
                BlockTensor {
                    name: "wk".into(),
                    key: 0,
                    weights: w.clone(),
                    precise,
                },
            ];
            install_blocks(&mut model, &tensors).unwrap();
            let model = model.into_decluttered().unwrap();
            assert!(uses_blocks(&model));
            let got = run(model);
            let (g, e) = (
                got.try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec(),
                want.try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec(),
            );
            assert_eq!(g.len(), e.len());
            let max = e.iter().fold(0f32, |m, v| m.max(v.abs()));
            // 8-bit activations: about 1% of the magnitude; with their remainder, 1/254 of that
            let tolerance = if precise { 1e-4 } else { 1e-2 } * max;
            for (i, (a, b)) in g.iter().zip(&e).enumerate() {
                assert!(
                    (a - b).abs() <= tolerance,
                    "{kind:?} precise {precise} [{i}]: {a} vs {b}"
                );
            }
        }
    }
}
