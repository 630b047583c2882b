"""Builds a standard opset-23 ONNX decoder graph from LlamaWeights.

Shape of the graph (what tract's `transformers_detect_all` turns into a stateful KV cache):
inputs `input_ids` [1, S] and `past_key_i` / `past_value_i` [1, kv_heads, P, head_dim]; outputs
`logits` [1, vocab] for the last position only, and `present_key_i` / `present_value_i`.
Only standard ops: Gather, RMSNormalization, MatMul, RotaryEmbedding, Attention, Sigmoid, Mul, Add.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .weights import LlamaWeights

OPSET = 23


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF stores Q/K rows with rotary pairs adjacent; undo it to the half-split (HF) layout.

    llama.cpp's converter did `w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`; this is its inverse.
    """
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def rope_tables(head_dim: int, max_pos: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def build_model(weights: LlamaWeights) -> tuple[onnx.ModelProto, list[tuple[str, str, int | None]]]:
    """The graph, and which GGUF tensor each weight constant holds: (constant name, tensor name,
    heads when the rows were un-permuted for rotary, else None)."""
    cfg = weights.config
    hd = cfg.head_dim
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        # np.ascontiguousarray would turn 0-d scalars into 1-d arrays
        inits.append(numpy_helper.from_array(np.require(arr, requirements="C"), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] + "." + op, **attrs))

    sources: list[tuple[str, str, int | None]] = []

    def linear(x: str, wname: str, gguf_name: str, out: str, heads: int | None = None) -> str:
        w = weights.get(gguf_name)
        if heads is not None:
            w = unpermute_qk(w, heads)
        sources.append((wname, gguf_name, heads))
        # weights stored transposed ([in, out]) so the MatMul is x @ W with no Transpose node
        node("MatMul", [x, const(wname, w.T)], [out])
        return out

    graph_inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])]
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, cfg.vocab])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            graph_inputs.append(helper.make_tensor_value_info(
                f"past_{kind}_{i}", TensorProto.FLOAT, [1, cfg.n_kv_heads, "P", hd]))
            graph_outputs.append(helper.make_tensor_value_info(
                f"present_{kind}_{i}", TensorProto.FLOAT, [1, cfg.n_kv_heads, "PS", hd]))

    # positions P .. P+S, from the past length and the number of new tokens
    const("one_i64", np.array(1, np.int64))
    node("Shape", ["past_key_0"], ["past_len_1d"], start=2, end=3)
    node("Shape", ["input_ids"], ["seq_len_1d"], start=1, end=2)
    node("Add", ["past_len_1d", "seq_len_1d"], ["end_1d"])
    const("axis0", np.array([0], np.int64))
    node("Squeeze", ["past_len_1d", "axis0"], ["past_len"])
    node("Squeeze", ["end_1d", "axis0"], ["end_pos"])
    node("Range", ["past_len", "end_pos", "one_i64"], ["positions_1d"])
    node("Unsqueeze", ["positions_1d", "axis0"], ["position_ids"])
    cos, sin = rope_tables(hd, cfg.context_length, cfg.rope_base)
    const("rope_cos", cos)
    const("rope_sin", sin)

    node("Gather", [const("embed_tokens", weights.get("token_embd.weight")), "input_ids"], ["h0"], axis=0)
    sources.append(("embed_tokens", "token_embd.weight", None))
    x = "h0"
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        l = f"l{i}"
        node("RMSNormalization", [x, const(f"{l}.attn_norm", weights.get(p + "attn_norm.weight"))],
             [f"{l}.attn_in"], axis=-1, epsilon=cfg.rms_eps)
        q = linear(f"{l}.attn_in", f"{l}.wq", p + "attn_q.weight", f"{l}.q", cfg.n_heads)
        k = linear(f"{l}.attn_in", f"{l}.wk", p + "attn_k.weight", f"{l}.k", cfg.n_kv_heads)
        v = linear(f"{l}.attn_in", f"{l}.wv", p + "attn_v.weight", f"{l}.v")
        node("RotaryEmbedding", [q, "rope_cos", "rope_sin", "position_ids"], [f"{l}.q_rot"],
             num_heads=cfg.n_heads, interleaved=0)
        node("RotaryEmbedding", [k, "rope_cos", "rope_sin", "position_ids"], [f"{l}.k_rot"],
             num_heads=cfg.n_kv_heads, interleaved=0)
        node("Attention", [f"{l}.q_rot", f"{l}.k_rot", v, "", f"past_key_{i}", f"past_value_{i}"],
             [f"{l}.attn", f"present_key_{i}", f"present_value_{i}"],
             is_causal=1, q_num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, scale=float(1.0 / np.sqrt(hd)))
        o = linear(f"{l}.attn", f"{l}.wo", p + "attn_output.weight", f"{l}.o")
        node("Add", [x, o], [f"{l}.resid1"])
        node("RMSNormalization", [f"{l}.resid1", const(f"{l}.ffn_norm", weights.get(p + "ffn_norm.weight"))],
             [f"{l}.ffn_in"], axis=-1, epsilon=cfg.rms_eps)
        g = linear(f"{l}.ffn_in", f"{l}.wgate", p + "ffn_gate.weight", f"{l}.gate")
        u = linear(f"{l}.ffn_in", f"{l}.wup", p + "ffn_up.weight", f"{l}.up")
        node("Sigmoid", [g], [f"{l}.gate_sig"])
        node("Mul", [g, f"{l}.gate_sig"], [f"{l}.gate_silu"])
        node("Mul", [f"{l}.gate_silu", u], [f"{l}.act"])
        d = linear(f"{l}.act", f"{l}.wdown", p + "ffn_down.weight", f"{l}.down")
        node("Add", [f"{l}.resid1", d], [f"{l}.out"])
        x = f"{l}.out"

    # last position only: prefill does not pay for vocab-sized logits it would throw away
    const("last_idx", np.array(-1, np.int64))
    node("Gather", [x, "last_idx"], ["last_hidden"], axis=1)
    node("RMSNormalization", ["last_hidden", const("output_norm", weights.get("output_norm.weight"))],
         ["final_norm"], axis=-1, epsilon=cfg.rms_eps)
    # an untied copy of the head: one constant shared with the embedding makes tract repack it
    # every step (DESIGN.md section 2)
    linear("final_norm", "lm_head", weights.lm_head_name(), "logits")

    graph = helper.make_graph(nodes, "llama", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fieldllm-convert")
    model.ir_version = 10
    return model, sources
