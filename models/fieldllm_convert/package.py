"""Writes a model package directory: model.onnx, tokenizer.json, chat_template.jinja, manifest.toml."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx

from .onnx_graph import build_model
from .weights import LlamaWeights

MANIFEST_VERSION = 1


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def source_lines(source: dict) -> list[str]:
    """The manifest's `[source]` table: where the weights came from."""
    return ["", "[source]"] + [f"{k} = {_toml_str(str(v))}" for k, v in source.items()]


def write_manifest(out_dir: str, lines: list[str], files: list[str]) -> None:
    """manifest.toml: `lines`, then `[files]` with the sha256 of each of `files`."""
    lines = lines + ["", "[files]"] + [
        f"{_toml_str(fn)} = {_toml_str(sha256_file(os.path.join(out_dir, fn)))}" for fn in files]
    with open(os.path.join(out_dir, "manifest.toml"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_package(out_dir: str, weights: LlamaWeights, tokenizer: dict, chat_template: str, *,
                  name: str, bos: int, eos: list[int], license: str, source: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    cfg = weights.config
    model, sources = build_model(weights)
    onnx.save_model(model, os.path.join(out_dir, "model.onnx"))
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template)
    files = ["model.onnx", "tokenizer.json", "chat_template.jinja"]
    if weights.blocks:
        files += write_blocks(out_dir, weights, sources)
    params = sum(int(t.size) for t in weights.tensors.values())
    lines = [
        f"format_version = {MANIFEST_VERSION}",
        "",
        "[model]",
        f"name = {_toml_str(name)}",
        'family = "llama"',
        f"parameters = {params}",
        f"context_length = {cfg.context_length}",
        f"vocab_size = {cfg.vocab}",
        f"license = {_toml_str(license)}",
        "",
        "[architecture]",
        f"layers = {cfg.n_layers}",
        f"hidden = {cfg.hidden}",
        f"ffn = {cfg.ffn}",
        f"heads = {cfg.n_heads}",
        f"kv_heads = {cfg.n_kv_heads}",
        f"rope_base = {cfg.rope_base}",
        f"rms_eps = {cfg.rms_eps}",
    ] + source_lines(source) + [
        "",
        "[tokens]",
        f"bos = {bos}",
        f"eos = {json.dumps(eos)}",
        "",
        "[graph]",
        'format = "onnx"',
        'file = "model.onnx"',
        'weights = "f32"',
        "",
        "[chat]",
        'template = "chat_template.jinja"',
    ]
    write_manifest(out_dir, lines, files)


BLOCKS_BIN = "gguf_blocks.bin"
BLOCKS_INDEX = "gguf_blocks.json"


def write_blocks(out_dir: str, weights: LlamaWeights, sources: list[tuple[str, str, int | None]]) -> list[str]:
    """The GGUF's own quantized blocks for every graph weight that has them, in the graph's row
    order (Q/K rows un-permuted like the f32 copy), so `fieldllmd model import --weights gguf`
    runs them as they are. One copy per distinct tensor: the tied head shares the embedding's.

    gguf_blocks.json: {"tensors": [{"name": graph constant, "type": "Q4_1"|"Q8_0", "rows": out,
    "cols": in, "offset": byte offset in gguf_blocks.bin, "bytes": length}, ...]}
    """
    from .onnx_graph import unpermute_qk

    index, placed = [], {}
    with open(os.path.join(out_dir, BLOCKS_BIN), "wb") as f:
        offset = 0
        for const_name, gguf_name, heads in sources:
            raw = weights.blocks.get(gguf_name)
            if raw is None:
                continue
            key = (gguf_name, heads)
            if key not in placed:
                data = unpermute_qk(raw, heads) if heads is not None else raw
                data = np.ascontiguousarray(data)
                f.write(data.tobytes())
                placed[key] = (offset, data.nbytes)
                offset += data.nbytes
            rows, cols = weights.get(gguf_name).shape
            off, nbytes = placed[key]
            index.append({"name": const_name, "type": weights.source_types[gguf_name], "rows": rows,
                          "cols": cols, "offset": off, "bytes": nbytes})
    with open(os.path.join(out_dir, BLOCKS_INDEX), "w") as f:
        json.dump({"tensors": index}, f, indent=1)
    return [BLOCKS_BIN, BLOCKS_INDEX]


def write_reference(path: str, run: dict, meta: dict) -> None:
    """Reference logits for the Rust tests: JSON, one entry per step (tokens fed, logits after)."""
    doc = dict(meta)
    doc["steps"] = [{"fed": s["fed"], "logits": [float(x) for x in s["logits"]]} for s in run["steps"]]
    with open(path, "w") as f:
        json.dump(doc, f)
