"""Llama-family weights in one in-memory form, read from a GGUF or made up for tests.

Every tensor is kept in the GGUF's own layout (row-major [out, in], Q/K rows permuted for
llama.cpp's interleaved rotary form), so the ONNX builder and the NumPy reference each do their
own layout work independently: a mistake in one shows up as a mismatch against the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LlamaConfig:
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    context_length: int
    rope_base: float
    rms_eps: float
    # "llama" (Q/K rows permuted for interleaved rotary) or "qwen2" (Q/K/V biases, rows in the
    # half-split order: llama.cpp's NEOX rotary)
    arch: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


@dataclass
class LlamaWeights:
    config: LlamaConfig
    # name -> float32 array, GGUF names and layout ("token_embd.weight", "blk.0.attn_q.weight", ...)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    # what the source stored, per tensor, for the manifest ("Q4_1", "Q8_0", "F32", ...)
    source_types: dict[str, str] = field(default_factory=dict)
    # the source's own quantized blocks, per quantized tensor: uint8 [rows, bytes per row]
    blocks: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def lm_head_name(self) -> str:
        """The LM head's tensor: tied to the embedding when the file has no output.weight."""
        return "output.weight" if "output.weight" in self.tensors else "token_embd.weight"

    def lm_head(self) -> np.ndarray:
        """[vocab, hidden]."""
        return self.tensors[self.lm_head_name()]


# the block types the daemon's kernels run as they are (daemon/src/engine/ggml)
BLOCK_TYPES = ("Q4_1", "Q8_0")


def read_gguf(path: str) -> tuple[LlamaWeights, dict]:
    """Dequantize a llama GGUF to float32. Returns the weights and the raw metadata fields."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: architecture {arch!r} is not supported (llama, qwen2)")
    cfg = LlamaConfig(
        n_layers=int(meta[f"{arch}.block_count"]),
        hidden=int(meta[f"{arch}.embedding_length"]),
        ffn=int(meta[f"{arch}.feed_forward_length"]),
        n_heads=int(meta[f"{arch}.attention.head_count"]),
        n_kv_heads=int(meta[f"{arch}.attention.head_count_kv"]),
        vocab=len(meta["tokenizer.ggml.tokens"]),
        context_length=int(meta[f"{arch}.context_length"]),
        rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        arch=arch,
    )
    w = LlamaWeights(cfg)
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        # GGUF lists dims fastest-first; numpy wants them slowest-first.
        shape = tuple(int(d) for d in reversed(t.shape))
        w.tensors[t.name] = arr.reshape(shape)
        w.source_types[t.name] = t.tensor_type.name
        if t.tensor_type.name in BLOCK_TYPES:
            w.blocks[t.name] = np.asarray(t.data, dtype=np.uint8).reshape(shape[0], -1)
    return w, meta


def random_weights(cfg: LlamaConfig, seed: int) -> LlamaWeights:
    """Deterministic random weights with the scale of a trained model (for fast tests)."""
    rng = np.random.default_rng(seed)
    w = LlamaWeights(cfg)

    def mat(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    hd = cfg.head_dim
    # small embeddings: the tied head then gives logits of a few units, a distribution soft
    # enough that sampling tests see different seeds pick different tokens
    w.tensors["token_embd.weight"] = (0.1 * rng.standard_normal((cfg.vocab, cfg.hidden))).astype(np.float32)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        w.tensors[p + "attn_norm.weight"] = norm(cfg.hidden)
        w.tensors[p + "attn_q.weight"] = mat(cfg.n_heads * hd, cfg.hidden)
        w.tensors[p + "attn_k.weight"] = mat(cfg.n_kv_heads * hd, cfg.hidden)
        w.tensors[p + "attn_v.weight"] = mat(cfg.n_kv_heads * hd, cfg.hidden)
        w.tensors[p + "attn_output.weight"] = mat(cfg.hidden, cfg.n_heads * hd)
        w.tensors[p + "ffn_norm.weight"] = norm(cfg.hidden)
        w.tensors[p + "ffn_gate.weight"] = mat(cfg.ffn, cfg.hidden)
        w.tensors[p + "ffn_up.weight"] = mat(cfg.ffn, cfg.hidden)
        w.tensors[p + "ffn_down.weight"] = mat(cfg.hidden, cfg.ffn)
    w.tensors["output_norm.weight"] = norm(cfg.hidden)
    w.source_types = {k: "F32" for k in w.tensors}
    return w
