"""Command line: `python -m fieldllm_convert gguf SRC OUT --name NAME` and `... tiny OUT`."""
from __future__ import annotations

import argparse
import sys

from .embedder import write_embedder
from .package import sha256_file, write_package, write_reference
from .reference import reference_run
from .tokenizer import TINY_SPECIALS, tiny_vocab, tokenizer_json
from .weights import LlamaConfig, random_weights, read_gguf

# The chat prompt of DESIGN.md's tokenizer test vector: llama.cpp's ids for the default system
# message plus "What is the capital of France?", ending with the assistant header.
CHAT_PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                   411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2,
                   198, 1, 520, 9531, 198]

TINY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cmd_gguf(args: argparse.Namespace) -> None:
    weights, meta = read_gguf(args.src)
    tok = tokenizer_json(list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"]),
                         list(meta["tokenizer.ggml.merges"]), str(meta.get("tokenizer.ggml.pre", "default")))
    eos = [int(meta["tokenizer.ggml.eos_token_id"])]
    toks = list(meta["tokenizer.ggml.tokens"])
    # also end on the end-of-text token, as llama.cpp's end-of-generation set does
    for extra in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>"):
        if extra in toks and toks.index(extra) not in eos:
            eos.append(toks.index(extra))
    qtypes = sorted(set(weights.source_types.values()))
    write_package(
        args.out, weights, tok, str(meta["tokenizer.chat_template"]), name=args.name,
        bos=int(meta["tokenizer.ggml.bos_token_id"]), eos=eos,
        license=str(meta.get("general.license", "unknown")),
        source={"file": args.src.rsplit("/", 1)[-1], "sha256": sha256_file(args.src),
                "quantization": "+".join(qtypes)},
    )
    if args.reference:
        run = reference_run(weights, CHAT_PROMPT_IDS, args.decode_steps)
        write_reference(args.reference, run, {"model": args.name})
    print(f"wrote {args.out}")


def cmd_tiny(args: argparse.Namespace) -> None:
    tokens, types, merges = tiny_vocab(n_merges=64)
    cfg = LlamaConfig(n_layers=2, hidden=64, ffn=128, n_heads=4, n_kv_heads=2, vocab=len(tokens),
                      context_length=256, rope_base=10000.0, rms_eps=1e-5)
    weights = random_weights(cfg, seed=args.seed)
    write_package(args.out, weights, tokenizer_json(tokens, types, merges, "gpt-2"), TINY_TEMPLATE,
                  name="tiny-llama", bos=TINY_SPECIALS.index("<|im_start|>"),
                  eos=[TINY_SPECIALS.index("<|im_end|>"), TINY_SPECIALS.index("<|endoftext|>")],
                  license="apache-2.0", source={"file": "random", "seed": args.seed, "quantization": "F32"})
    if args.reference:
        prompt = [1, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 2, 1]
        run = reference_run(weights, prompt, args.decode_steps)
        write_reference(args.reference, run, {"model": "tiny-llama"})
    print(f"wrote {args.out}")


def cmd_embedder(args: argparse.Namespace) -> None:
    src = args.src
    write_embedder(src, args.out, args.name, {"file": args.source_file, "sha256": args.source_sha256},
                   args.reference)
    print(f"wrote {args.out}")


def cmd_tiny_gguf(args: argparse.Namespace) -> None:
    from .tiny_gguf import cmd_tiny_gguf as run
    run(args.out, args.decode_steps, args.seed)


def cmd_shaped_gguf(args: argparse.Namespace) -> None:
    from .tiny_gguf import write_shaped_gguf
    write_shaped_gguf(args.out)
    print(f"wrote {args.out}")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fieldllm_convert")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf", help="convert a llama GGUF into a model package")
    g.add_argument("src")
    g.add_argument("out")
    g.add_argument("--name", required=True)
    g.add_argument("--reference", help="also write NumPy reference logits (JSON) here")
    g.add_argument("--decode-steps", type=int, default=8)
    g.set_defaults(func=cmd_gguf)
    t = sub.add_parser("tiny", help="write the tiny random-weight test model")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=20261127)
    t.add_argument("--reference")
    t.add_argument("--decode-steps", type=int, default=8)
    t.set_defaults(func=cmd_tiny)
    tg = sub.add_parser("tiny-gguf", help="write tiny random-weight llama GGUFs and their NumPy logits")
    tg.add_argument("out", help="folder: NAME.gguf and NAME.reference.json per variant")
    tg.add_argument("--seed", type=int, default=20261203)
    tg.add_argument("--decode-steps", type=int, default=8)
    tg.set_defaults(func=cmd_tiny_gguf)
    sg = sub.add_parser("shaped-gguf", help="write a random-weight GGUF of Llama 3.2 1B's shape (Q4_K_M types)")
    sg.add_argument("out")
    sg.set_defaults(func=cmd_shaped_gguf)
    e = sub.add_parser("embedder", help="convert a sentence-transformers BERT (safetensors) into a package")
    e.add_argument("src", help="the model folder: config.json, model.safetensors, tokenizer.json, 1_Pooling/")
    e.add_argument("out")
    e.add_argument("--name", required=True)
    e.add_argument("--source-file", required=True, help="what the model came in (recorded in the manifest)")
    e.add_argument("--source-sha256", required=True)
    e.add_argument("--reference", help="also write NumPy reference embeddings (JSON) here")
    e.set_defaults(func=cmd_embedder)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
