//! Open rows: a decoder graph rewritten at load so that one run can carry the tokens of several
//! conversations ([`crate::batch`]).
//!
//! A decoder as the GGUF import writes it (and as tract's own Llama graphs go) assumes every row
//! of a run is the next token of one conversation: the rotary positions are the range `P .. P +
//! S` after the cache's `P` tokens, and the logits are those of the last row. Opening its rows
//! makes both inputs of the run:
//! - [`POSITIONS`] `[S]` i64: each row's position, in place of the range (the rotary tables are
//!   gathered at them);
//! - [`SLOTS`] `[S]` i64: each row's conversation, read by the attention ([`crate::attention`]:
//!   each conversation's keys and values in a cache of its own);
//! - [`LOGIT_ROWS`] `[R]` i64: the rows whose logits the run returns (`[R, vocab]`), in place
//!   of the last one.
//!
//! A run of one conversation passes its positions, slot 0 and its last row, and computes what
//! the closed graph computed. A graph that is not of this shape is left closed and runs one
//! conversation at a time, as before.

use tract_core::internal::*;
use tract_core::ops::array::{Gather, Range, Slice};

/// The positions input.
pub const POSITIONS: &str = "fieldllm_positions";
/// The slots input.
pub const SLOTS: &str = "fieldllm_slots";
/// The logit rows input.
pub const LOGIT_ROWS: &str = "fieldllm_logit_rows";

/// Opens the rows of a decluttered decoder (token ids `[1, S]` in, logits `[1, vocab]` out, one
/// position range, the last row picked before the head). Returns whether it did; a graph of
/// another shape is left as it was.
pub fn open(model: &mut TypedModel) -> TractResult<bool> {
    let Some(shape) = Shape::find(model)? else {
        return Ok(false);
    };
    let s = shape.s.clone();
    let positions = model.add_source(POSITIONS, i64::fact([s.clone()]))?;
    for inlet in model.nodes[shape.range].outputs[0].successors.clone() {
        model.add_edge(positions, inlet)?;
    }
    let slots = model.add_source(SLOTS, i64::fact([s]))?;
    let r = model.symbols.new_with_prefix("R");
    let rows = model.add_source(LOGIT_ROWS, i64::fact([r.to_dim()]))?;
    // x [1, S, hidden] -> gather [1, R, hidden] -> [R, hidden]: the head's rank as before
    let picked = model.wire_node(
        "fieldllm_pick_rows",
        Gather::new(1),
        &[shape.picked_from, rows],
    )?[0];
    let picked = model.wire_node("fieldllm_pick_rows.rm", AxisOp::Rm(0), &[picked])?[0];
    for inlet in model.nodes[shape.pick_end].outputs[0].successors.clone() {
        model.add_edge(picked, inlet)?;
    }
    let ids = model.inputs[0];
    model.set_input_outlets(&[ids, positions, slots, rows])?;
    model.refresh_output_facts()?;
    model.compact()?;
    Ok(true)
}

/// The parts of a decoder that [`open`] rewrites.
struct Shape {
    /// Rows per run.
    s: TDim,
    /// The `Range` node of the positions.
    range: usize,
    /// The hidden states `[1, S, hidden]` the last row is picked from.
    picked_from: OutletId,
    /// The node whose output is the picked row, `[1, hidden]`.
    pick_end: usize,
}

impl Shape {
    fn find(model: &TypedModel) -> TractResult<Option<Shape>> {
        if model.inputs.len() != 1 || model.outputs.len() != 1 {
            return Ok(None);
        }
        let ids = model.outlet_fact(model.inputs[0])?;
        if ids.rank() != 2 || ids.shape[0] != 1.to_dim() {
            return Ok(None);
        }
        let s = ids.shape[1].clone();
        let ranges: Vec<usize> = model
            .nodes
            .iter()
            .filter(|n| n.op_is::<Range>())
            .map(|n| n.id)
            .collect();
        let [range] = ranges[..] else {
            return Ok(None);
        };
        if model.outlet_fact(OutletId::new(range, 0))?.shape.dims() != [s.clone()] {
            return Ok(None);
        }
        let Some((picked_from, pick_end)) = last_row_pick(model, &s)? else {
            return Ok(None);
        };
        Ok(Some(Shape {
            s,
            range,
            picked_from,
            pick_end,
        }))
    }
}

/// The one place the graph picks the last of the `s` rows of `[1, s, hidden]` hidden states,
/// leaving `[1, hidden]`: a gather at index -1 (or `s - 1`) on axis 1, or a slice of that row
/// and the removal of the axis.
fn last_row_pick(model: &TypedModel, s: &TDim) -> TractResult<Option<(OutletId, usize)>> {
    let mut found = vec![];
    for node in &model.nodes {
        let input = match node.inputs.first() {
            Some(&i) => i,
            None => continue,
        };
        let fact = model.outlet_fact(input)?;
        if fact.rank() != 3 || fact.shape[0] != 1.to_dim() || fact.shape[1] != *s {
            continue;
        }
        if let Some(g) = node.op_as::<Gather>() {
            let index = model.outlet_fact(node.inputs[1])?.konst.clone();
            let last = index.is_some_and(|t| {
                t.rank() == 0
                    && t.cast_to_scalar::<i64>()
                        .is_ok_and(|i| i == -1 || s.as_i64() == Some(i + 1))
            });
            if g.axis == 1 && last {
                found.push((input, node.id));
            }
        } else if let Some(sl) = node.op_as::<Slice>() {
            let last = sl.axis == 1 && sl.end == *s && sl.start == s.clone() - 1;
            let succ = &node.outputs[0].successors;
            if last
                && let [only] = succ[..]
                && model.nodes[only.node]
                    .op_as::<AxisOp>()
                    .is_some_and(|op| *op == AxisOp::Rm(1))
            {
                found.push((input, only.node));
            }
        }
    }
    Ok(match found[..] {
        [one] => Some(one),
        _ => None,
    })
}

/// The positions and slots inputs of an optimized model with open rows, for the attention.
pub fn attention_inputs(model: &TypedModel) -> TractResult<(OutletId, OutletId)> {
    let find = |name: &str| {
        model
            .inputs
            .iter()
            .copied()
            .find(|o| model.nodes[o.node].name == name)
            .with_context(|| format!("the model's rows are open but it has no input {name}"))
    };
    Ok((find(POSITIONS)?, find(SLOTS)?))
}
