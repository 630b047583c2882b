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

# name -> (heads, kv heads, tensor type by role, untied head, Llama 3.1 rotary factors); roles
# "down" (ffn_down) and "v" (attn_v) default to "ffn" and "attn"; a K-quant needs rows of 256
VARIANTS: dict[str, tuple[int, int, dict[str, Q], bool, bool]] = {
    # SmolLM2's shape: grouped-query attention, the head tied to the embedding, f32
    "tiny-gqa-f32": (4, 2, {"embd": Q.F32, "attn": Q.F32, "ffn": Q.F32, "output": Q.F32}, False, False),
    # Llama 3.2's: 4 query heads per key/value head, an untied head, rope_freqs, f16 and bf16
    "tiny-llama3": (8, 2, {"embd": Q.BF16, "attn": Q.F16, "ffn": Q.F16, "output": Q.F16}, True, True),
    # the file's own blocks, mixed: Q8_0 attention and embedding, Q4_1 MLP, tied head
    "tiny-blocks": (4, 1, {"embd": Q.Q8_0, "attn": Q.Q8_0, "ffn": Q.Q4_1, "output": Q.Q8_0}, False, False),
    # the legacy 32-weight types people download: Q4_0, Q5_0, Q5_1
    "tiny-legacy": (4, 2, {"embd": Q.Q5_0, "attn": Q.Q4_0, "v": Q.Q5_1, "ffn": Q.Q5_1, "down": Q.Q5_0,
                           "output": Q.Q4_0}, True, False),
    # a Q4_K_M file's mix: Q4_K, Q6_K for ffn_down, attn_v and the (tied) embedding, Q5_K
    "tiny-kquants": (4, 2, {"embd": Q.Q6_K, "attn": Q.Q4_K, "v": Q.Q6_K, "ffn": Q.Q5_K, "down": Q.Q6_K,
                            "output": Q.Q6_K}, False, True),
    # Qwen2 / Qwen2.5: Q/K/V biases, Q/K rows in the half-split rotary order (NEOX), tied head
    "tiny-qwen2": (4, 2, {"embd": Q.Q8_0, "attn": Q.F16, "ffn": Q.Q4_0, "output": Q.Q8_0}, False, False),
}
QWEN2 = {"tiny-qwen2"}


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


def random_kquant(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
    """Random but valid K-quant blocks (gguf cannot quantize to K-quants; its dequantizer, which
    the reference uses, reads them), scaled so a weight is about 1/sqrt(cols) like `mat`'s."""
    nb = cols // 256
    u8 = lambda n: rng.integers(0, 256, size=(rows, nb, n), dtype=np.uint8)  # noqa: E731
    f16 = lambda v: np.full((rows, nb, 1), v, np.float16).view(np.uint8)  # noqa: E731
    unit = 1.0 / np.sqrt(cols)
    if qtype == Q.Q4_K:
        parts = [f16(2 * unit / (63 * 15)), f16(unit / 63), u8(12), u8(128)]
    elif qtype == Q.Q5_K:
        parts = [f16(2 * unit / (63 * 31)), f16(unit / 63), u8(12), u8(32), u8(128)]
    elif qtype == Q.Q6_K:
        scales = rng.integers(-64, 64, size=(rows, nb, 16)).astype(np.int8).view(np.uint8)
        parts = [u8(128), u8(64), scales, f16(unit / (64 * 32))]
    else:
        raise ValueError(qtype)
    return np.concatenate(parts, axis=2).reshape(rows, -1)


def write_tiny_gguf(path: str, variant: str, seed: int, bad: str | None = None) -> None:
    """`bad` makes one thing wrong: another architecture, a tensor type without a kernel, a
    vocabulary one token short of the embedding, a product of the wrong shape, a missing or a
    mistyped hyper-parameter."""
    heads, kv_heads, types, untied, rope_freqs = VARIANTS[variant]
    tokens, token_types, merges = tiny_vocab(n_merges=64)
    wide = variant == "tiny-kquants"
    types = {"down": types["ffn"], "v": types["attn"], **types}
    cfg = LlamaConfig(n_layers=2, hidden=256 if wide else 64, ffn=512 if wide else 128, n_heads=heads,
                      n_kv_heads=kv_heads, vocab=len(tokens),
                      context_length=256, rope_base=10000.0, rms_eps=1e-5)
    rng = np.random.default_rng(seed)
    hd = cfg.head_dim
    arch = "qwen3" if bad == "architecture" else "qwen2" if variant in QWEN2 else "llama"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(variant)
    if bad == "key-type":
        w.add_string(f"{arch}.block_count", str(cfg.n_layers))
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
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "gpt-2")
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
        elif qtype == Q.F64:
            w.add_tensor(name, arr.astype(np.float64))
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            w.add_tensor(name, random_kquant(rng, arr.shape[0], arr.shape[1], qtype), raw_dtype=qtype)
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
        put(p + "attn_v.weight", mat(kv_heads * hd, cfg.hidden), types["v"])
        put(p + "attn_output.weight", mat(cfg.hidden, heads * hd), types["attn"])
        if arch == "qwen2":
            for t, n in (("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
                put(p + f"attn_{t}.bias", 0.2 * rng.standard_normal(n), Q.F32)
        put(p + "ffn_norm.weight", norm(cfg.hidden), Q.F32)
        put(p + "ffn_gate.weight", mat(cfg.ffn, cfg.hidden), types["ffn"])
        put(p + "ffn_up.weight", mat(cfg.ffn, cfg.hidden), Q.F64 if bad == "tensor-type" else types["ffn"])
        put(p + "ffn_down.weight", mat(cfg.hidden, cfg.ffn), types["down"])
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
        # every block-quantized tensor as gguf dequantizes it, in the file's order, f32 LE:
        # the Rust forms must give these values bit for bit
        with open(os.path.join(out_dir, variant + ".dequant.f32"), "wb") as f:
            for t in gguf.GGUFReader(path).tensors:
                if t.tensor_type not in (Q.F32, Q.F16, Q.BF16):
                    f.write(weights.tensors[t.name].astype("<f4").tobytes())
        run = reference_run(weights, TINY_PROMPT, decode_steps)
        write_reference(os.path.join(out_dir, variant + ".reference.json"), run, {"model": variant})
    for bad in BAD:
        write_tiny_gguf(os.path.join(out_dir, f"bad-{bad}.gguf"), "tiny-blocks", seed, bad)
    with open(os.path.join(out_dir, "variants.json"), "w") as f:
        json.dump(sorted(VARIANTS), f)
    print(f"wrote {out_dir}")


def write_shaped_gguf(path: str, seed: int = 1) -> None:
    """A random-weight GGUF of Llama 3.2 1B's shape (16 layers, hidden 2048, ffn 8192, 32/8
    heads, 128,256 tokens, 131,072 context, rope_freqs, tied head) in a Q4_K_M file's types
    (Q4_K, Q6_K for ffn_down and the embedding): for memory measurements at the size users
    run, without downloading Meta's weights. Random K-quant blocks, so nothing is quantized."""
    from .tokenizer import bytes_to_unicode
    rng = np.random.default_rng(seed)
    layers, hidden, ffn, heads, kv, vocab, hd = 16, 2048, 8192, 32, 8, 128256, 64
    b2u = bytes_to_unicode()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tokens = [b2u[b] for b in range(256)]
    # one merge ("Ġ t": a BPE vocabulary needs merges), the rest tokens no text reaches
    tokens += ["Ġt"] + [f"Ġt{i}" for i in range(vocab - len(tokens) - len(specials) - 1)] + specials
    types = [1] * (vocab - len(specials)) + [3] * len(specials)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("random-llama-3.2-1b-shape")
    w.add_block_count(layers)
    w.add_context_length(131072)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template(TINY_TEMPLATE)
    norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", random_kquant(rng, vocab, hidden, Q.Q6_K), raw_dtype=Q.Q6_K)
    w.add_tensor("rope_freqs.weight", llama3_factors(hd, 500000.0, old_ctx=8192))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(hidden))
        for t, rows in (("q", hidden), ("k", kv * hd), ("v", kv * hd), ("output", hidden)):
            w.add_tensor(p + f"attn_{t}.weight", random_kquant(rng, rows, hidden, Q.Q4_K), raw_dtype=Q.Q4_K)
        w.add_tensor(p + "ffn_norm.weight", norm(hidden))
        for t in ("gate", "up"):
            w.add_tensor(p + f"ffn_{t}.weight", random_kquant(rng, ffn, hidden, Q.Q4_K), raw_dtype=Q.Q4_K)
        w.add_tensor(p + "ffn_down.weight", random_kquant(rng, hidden, ffn, Q.Q6_K), raw_dtype=Q.Q6_K)
    w.add_tensor("output_norm.weight", norm(hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
