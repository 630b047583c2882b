//! The NNEF extension `fieldllm`, so an artifact saves and loads the block ops: a primitive per
//! op and block type, and the dumpers that write them.

use std::sync::Arc;

use tract_core::internal::*;
use tract_nnef::internal as nnef;

use super::{GgmlGather, GgmlMatMul};
use crate::ggml::BlockKind;

/// The NNEF extension `fieldllm`: `fieldllm_matmul_FORM(input, w, rows = N)` for each
/// [`BlockKind`] (`q4_1`, `q8_0`, `q8_min`, `q8_half`), and `fieldllm_gather_FORM` likewise
/// (`input` the token ids).
pub fn registry() -> nnef::Registry {
    let mut reg = nnef::Registry::new("fieldllm")
        .with_doc("Extension `fieldllm`: matrix products and lookups on GGUF weight blocks");
    let params = [
        nnef::TypeName::Scalar.tensor().named("input"),
        nnef::TypeName::Scalar.tensor().named("w"),
        nnef::TypeName::Integer.named("rows"),
        nnef::TypeName::Logical.named("precise").default(false),
    ];
    let out = [("output", nnef::TypeName::Scalar.tensor())];
    // one primitive per op and form; the loader takes the form from the name
    for kind in BlockKind::ALL {
        let form = kind.name().to_lowercase();
        let matmul: nnef::ToTract = |b, i| deser(b, i, false);
        let gather: nnef::ToTract = |b, i| deser(b, i, true);
        reg.register_primitive(format!("fieldllm_matmul_{form}"), &params, &out, matmul);
        reg.register_primitive(format!("fieldllm_gather_{form}"), &params, &out, gather);
    }
    // the packed blocks' constants, mapped from the artifact (see crate::mapped)
    crate::mapped::register_variable(&mut reg);
    reg.register_dumper(|ast, node, op: &GgmlMatMul| {
        dump(
            ast,
            node,
            format!("fieldllm_matmul_{}", op.kind.name().to_lowercase()),
            op.n,
            op.precise,
        )
    });
    reg.register_dumper(|ast, node, op: &GgmlGather| {
        dump(
            ast,
            node,
            format!("fieldllm_gather_{}", op.kind.name().to_lowercase()),
            op.n,
            false,
        )
    });
    reg
}

fn dump(
    ast: &mut nnef::IntoAst<'_>,
    node: &TypedNode,
    prim: String,
    rows: usize,
    precise: bool,
) -> TractResult<Option<Arc<nnef::RValue>>> {
    let inputs: Vec<_> = node.inputs.iter().map(|i| ast.mapping[i].clone()).collect();
    let mut attrs = vec![("rows", nnef::numeric(rows))];
    if precise {
        attrs.push(("precise", nnef::logical(true)));
    }
    Ok(Some(nnef::invocation(&prim, &inputs, &attrs)))
}

fn deser(
    builder: &mut nnef::ModelBuilder<'_>,
    invocation: &nnef::ResolvedInvocation<'_>,
    gather: bool,
) -> TractResult<nnef::Value> {
    let prim = invocation.invocation.id.0.as_str();
    let form = prim
        .strip_prefix(if gather {
            "fieldllm_gather_"
        } else {
            "fieldllm_matmul_"
        })
        .unwrap_or_default()
        .to_uppercase();
    let kind = BlockKind::parse(&form).with_context(|| format!("{prim}: no such block form"))?;
    let input: OutletId = invocation.named_arg_as(builder, "input")?;
    let w: OutletId = invocation.named_arg_as(builder, "w")?;
    let n: i64 = invocation.named_arg_as(builder, "rows")?;
    ensure!(n > 0, "rows must be positive");
    let n = n as usize;
    if gather {
        builder.wire(GgmlGather { kind, n }, &[input, w])
    } else {
        let precise: bool = invocation.named_arg_as(builder, "precise")?;
        builder.wire(
            GgmlMatMul {
                kind,
                n,
                precise,
                team: None,
            },
            &[input, w],
        )
    }
}
