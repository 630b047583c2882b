"""An independent NumPy forward pass of a llama model, written the way llama.cpp computes it.

It works on the GGUF layout directly (interleaved rotary pairs, permuted Q/K rows, tied head), so
it shares no layout code with the ONNX builder. Used to produce the logits the Rust tests check.
"""
from __future__ import annotations

import numpy as np

from .weights import LlamaWeights


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * w).astype(np.float32)


def _rope_interleaved(x: np.ndarray, positions: np.ndarray, base: float,
                      factors: np.ndarray | None = None) -> np.ndarray:
    """x: [seq, heads, head_dim]; rotates adjacent pairs (GGUF's layout for llama). `factors`:
    Llama 3.1's rope_freqs, dividing each frequency (ggml's `freq_factors`)."""
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    if factors is not None:
        inv = inv / factors.astype(np.float64)
    ang = positions[:, None].astype(np.float64) * inv[None, :]  # [seq, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    out = np.empty(x.shape, dtype=np.float64)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out.astype(np.float32)


def _rope_neox(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """x: [seq, heads, head_dim]; rotates the two halves (Qwen2's layout, llama.cpp's NEOX)."""
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., : hd // 2].astype(np.float64), x[..., hd // 2:].astype(np.float64)
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).astype(np.float32)


class ReferenceModel:
    """Keeps a KV cache so decode steps reuse earlier positions, like the engine does."""

    def __init__(self, weights: LlamaWeights):
        self.w = weights
        self.cfg = weights.config
        self.k_cache: list[np.ndarray] = [np.zeros((0, self.cfg.n_kv_heads, self.cfg.head_dim), np.float32)] * self.cfg.n_layers
        self.v_cache: list[np.ndarray] = list(self.k_cache)

    @property
    def n_past(self) -> int:
        return self.k_cache[0].shape[0]

    def forward(self, tokens: list[int]) -> np.ndarray:
        """Feeds tokens; returns the logits [vocab] of the last one."""
        cfg, w = self.cfg, self.w
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        seq = len(tokens)
        pos = np.arange(self.n_past, self.n_past + seq)
        x = w.get("token_embd.weight")[np.array(tokens)]
        factors = w.tensors.get("rope_freqs.weight")
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            h = _rms_norm(x, w.get(p + "attn_norm.weight"), cfg.rms_eps)
            q, k, v = (h @ w.get(p + f"attn_{t}.weight").T for t in "qkv")
            if cfg.arch == "qwen2":
                q, k, v = (y + w.get(p + f"attn_{t}.bias") for y, t in zip((q, k, v), "qkv"))
            q, k, v = q.reshape(seq, nh, hd), k.reshape(seq, nkv, hd), v.reshape(seq, nkv, hd)
            if cfg.arch == "qwen2":
                q, k = _rope_neox(q, pos, cfg.rope_base), _rope_neox(k, pos, cfg.rope_base)
            else:
                q = _rope_interleaved(q, pos, cfg.rope_base, factors)
                k = _rope_interleaved(k, pos, cfg.rope_base, factors)
            self.k_cache[i] = np.concatenate([self.k_cache[i], k])
            self.v_cache[i] = np.concatenate([self.v_cache[i], v])
            kk, vv = self.k_cache[i], self.v_cache[i]
            total = kk.shape[0]
            out = np.empty((seq, nh, hd), np.float32)
            group = nh // nkv
            for head in range(nh):
                kvh = head // group
                scores = (q[:, head, :].astype(np.float64) @ kk[:, kvh, :].T.astype(np.float64)) / np.sqrt(hd)
                # query j (absolute position n_past + j) sees keys 0..=n_past + j
                mask = np.arange(total)[None, :] > pos[:, None]
                scores[mask] = -np.inf
                scores -= scores.max(axis=-1, keepdims=True)
                probs = np.exp(scores)
                probs /= probs.sum(axis=-1, keepdims=True)
                out[:, head, :] = (probs @ vv[:, kvh, :].astype(np.float64)).astype(np.float32)
            x = x + out.reshape(seq, nh * hd) @ w.get(p + "attn_output.weight").T
            h = _rms_norm(x, w.get(p + "ffn_norm.weight"), cfg.rms_eps)
            g = h @ w.get(p + "ffn_gate.weight").T
            u = h @ w.get(p + "ffn_up.weight").T
            a = (g / (1.0 + np.exp(-g.astype(np.float64)))).astype(np.float32) * u
            x = x + a @ w.get(p + "ffn_down.weight").T
        h = _rms_norm(x[-1:], w.get("output_norm.weight"), cfg.rms_eps)
        return (h @ w.lm_head().T)[0].astype(np.float32)


def reference_run(weights: LlamaWeights, prompt: list[int], decode_steps: int) -> dict:
    """Prefill `prompt`, then greedily decode; returns tokens fed and logits after each step."""
    m = ReferenceModel(weights)
    steps = []
    logits = m.forward(prompt)
    steps.append({"fed": list(prompt), "logits": logits})
    for _ in range(decode_steps):
        nxt = int(np.argmax(logits))
        logits = m.forward([nxt])
        steps.append({"fed": [nxt], "logits": logits})
    return {"steps": steps}
