"""HF `tokenizer.json` (byte-level BPE) from GGUF tokenizer metadata, and a tiny one for tests."""
from __future__ import annotations

import re
from collections import Counter

# llama.cpp's pre-tokenizer names -> the HF pre-tokenizer that splits text the same way.
# "smollm" (and starcoder, refact): each digit alone, then the GPT-2 regex.
_PRE_TOKENIZERS = {
    "smollm": [{"type": "Digits", "individual_digits": True}],
    "starcoder": [{"type": "Digits", "individual_digits": True}],
    "refact": [{"type": "Digits", "individual_digits": True}],
    "gpt-2": [],
    "default": [],
}

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_json(tokens: list[str], token_types: list[int], merges: list[str], pre: str) -> dict:
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}")
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": token_types[i] == TOKEN_TYPE_CONTROL}
        for i, t in enumerate(tokens)
        if token_types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": _PRE_TOKENIZERS[pre] + [
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TINY_CORPUS = (
    "The pump is running. The valve is open. What is the pressure? The pressure is low. "
    "Check the filter, then the seal. Is the motor hot? The motor is hot; stop the pump. "
    "The capital of France is Paris. Hello, how can I help you today? 12 volts, 3 amps."
)


def tiny_vocab(n_merges: int) -> tuple[list[str], list[int], list[str]]:
    """A small byte-level BPE trained deterministically on a fixed text: specials, 256 bytes, merges."""
    b2u = bytes_to_unicode()
    tokens = list(TINY_SPECIALS) + [b2u[b] for b in range(256)]
    words = Counter(tuple(b2u[b] for b in w.encode()) for w in re.findall(r" ?[A-Za-z]+| ?[^\sA-Za-z]+|\s+", _TINY_CORPUS))
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    types = [TOKEN_TYPE_CONTROL] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    return tokens, types, merges
