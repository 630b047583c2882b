"""Tiny random-weight Llama GGUFs, written with the `gguf` package the way llama.cpp's converter
lays them out, and their NumPy reference logits: what `fieldllmd model import FILE.gguf` is
checked against for each shape it must build (grouped-query attention, tied and untied heads,
Llama 3.1's rotary factors, float and block-quantized tensors in one file).

The reference reads the file back with gguf's reader and dequantizer, so it sees exactly the
weights the file holds; it shares no code with the Rust importer.
"""
from __future__ import annotations

import json
import os

import gguf
import numpy as np

from .package import write_reference
from .reference import reference_run
from .tokenizer import TINY_SPECIALS, tiny_vocab
from .weights import LlamaConfig, read_gguf

TINY_PROMPT = [1, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 2, 1]
TINY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
Q = gguf.GGMLQuantizationType

# name -> (heads, kv heads, tensor type by role, untied head, Llama 3.1 rotary factors)
VARIANTS: dict[str, tuple[int, int, dict[str, Q], bool, bool]] = {
    # SmolLM2's shape: grouped-query attention, the head tied to the embedding, f32
    "tiny-gqa-f32": (4, 2, {"embd": Q.F32, "attn": Q.F32, "ffn": Q.F32, "output": Q.F32}, False, False),
    # Llama 3.2's: 4 query heads per key/value head, an untied head, rope_freqs, f16 and bf16
    "tiny-llama3": (8, 2, {"embd": Q.BF16, "attn": Q.F16, "ffn": Q.F16, "output": Q.F16}, True, True),
    # the file's own blocks, mixed: Q8_0 attention and embedding, Q4_1 MLP, tied head
    "tiny-blocks": (4, 1, {"embd": Q.Q8_0, "attn": Q.Q8_0, "ffn": Q.Q4_1, "output": Q.Q8_0}, False, False),
}


def llama3_factors(head_dim: int, base: float, factor: float = 8.0, low: float = 1.0, high: float = 4.0,
                   old_ctx: int = 64) -> np.ndarray:
    """rope_freqs as llama.cpp's converter computes it for rope_scaling type llama3 (a small
    original context so the tiny model's frequencies fall in all three bands)."""
    freqs = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    lo_wl, hi_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


# files fieldllm must refuse at import, by what is wrong with them (see BAD's use below)
BAD = ["architecture", "tensor-type", "vocabulary", "tensor-shape", "missing-key", "key-type"]


def write_tiny_gguf(path: str, variant: str, seed: int, bad: str | None = None) -> None:
    """`bad` makes one thing wrong: another architecture, a tensor type without a kernel, a
    vocabulary one token short of the embedding, a product of the wrong shape, a missing or a
    mistyped hyper-parameter."""
    heads, kv_heads, types, untied, rope_freqs = VARIANTS[variant]
    tokens, token_types, merges = tiny_vocab(n_merges=64)
    cfg = LlamaConfig(n_layers=2, hidden=64, ffn=128, n_heads=heads, n_kv_heads=kv_heads, vocab=len(tokens),
                      context_length=256, rope_base=10000.0, rms_eps=1e-5)
    rng = np.random.default_rng(seed)
    hd = cfg.head_dim
    w = gguf.GGUFWriter(path, "qwen3" if bad == "architecture" else "llama")
    w.add_name(variant)
    if bad == "key-type":
        w.add_string("llama.block_count", str(cfg.n_layers))
    else:
        w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.ffn)
    if bad != "missing-key":
        w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    if bad == "vocabulary":
        tokens, token_types = tokens[:-1], token_types[:-1]
        merges = merges[:-1]
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(TINY_SPECIALS.index("<|im_start|>"))
    w.add_eos_token_id(TINY_SPECIALS.index("<|im_end|>"))
    w.add_chat_template(TINY_TEMPLATE)

    def put(name: str, arr: np.ndarray, qtype: Q) -> None:
        arr = arr.astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    def mat(out_dim: int, in_dim: int) -> np.ndarray:
        return rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)

    def norm(n: int) -> np.ndarray:
        return 1.0 + 0.1 * rng.standard_normal(n)

    put("token_embd.weight", 0.1 * rng.standard_normal((cfg.vocab, cfg.hidden)), types["embd"])
    if rope_freqs:
        put("rope_freqs.weight", llama3_factors(hd, cfg.rope_base), Q.F32)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        put(p + "attn_norm.weight", norm(cfg.hidden), Q.F32)
        q_in = cfg.hidden // 2 if bad == "tensor-shape" else cfg.hidden
        put(p + "attn_q.weight", mat(heads * hd, q_in), types["attn"])
        put(p + "attn_k.weight", mat(kv_heads * hd, cfg.hidden), types["attn"])
        put(p + "attn_v.weight", mat(kv_heads * hd, cfg.hidden), types["attn"])
        put(p + "attn_output.weight", mat(cfg.hidden, heads * hd), types["attn"])
        put(p + "ffn_norm.weight", norm(cfg.hidden), Q.F32)
        put(p + "ffn_gate.weight", mat(cfg.ffn, cfg.hidden), types["ffn"])
        put(p + "ffn_up.weight", mat(cfg.ffn, cfg.hidden), Q.Q5_0 if bad == "tensor-type" else types["ffn"])
        put(p + "ffn_down.weight", mat(cfg.hidden, cfg.ffn), types["ffn"])
    put("output_norm.weight", norm(cfg.hidden), Q.F32)
    if untied:
        put("output.weight", mat(cfg.vocab, cfg.hidden), types["output"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def cmd_tiny_gguf(out_dir: str, decode_steps: int, seed: int) -> None:
    """Every variant as OUT_DIR/NAME.gguf with OUT_DIR/NAME.reference.json."""
    os.makedirs(out_dir, exist_ok=True)
    for n, variant in enumerate(VARIANTS):
        path = os.path.join(out_dir, variant + ".gguf")
        write_tiny_gguf(path, variant, seed + n)
        weights, _ = read_gguf(path)
        run = reference_run(weights, TINY_PROMPT, decode_steps)
        write_reference(os.path.join(out_dir, variant + ".reference.json"), run, {"model": variant})
    for bad in BAD:
        write_tiny_gguf(os.path.join(out_dir, f"bad-{bad}.gguf"), "tiny-blocks", seed, bad)
    with open(os.path.join(out_dir, "variants.json"), "w") as f:
        json.dump(sorted(VARIANTS), f)
    print(f"wrote {out_dir}")
