#!/usr/bin/env bash
# Peak RSS of `fieldllmd bench` with about 2,048 and 8,192 tokens in the KV cache (a prompt of N - 32
# tokens, then 16 decoded), at 2 threads: SmolLM2's artifact, and a random-weight model of Llama
# 3.2 1B's shape in a Q4_K_M file's types (`fieldllm_convert shaped-gguf`, imported in Rust).
# Issue 18's memory report; not part of CI (the 1B-shaped prefill of 8,176 tokens takes minutes).
#
#   tests/bench/kv_rss.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
cache=tests/bench/.cache
mkdir -p "$cache"
cargo build --release --locked -p fieldllmd
models/setup.sh target/release/fieldllmd >/dev/null
shaped="$root/$cache/llama-1b-shape.gguf"
if [ ! -f "$shaped" ]; then
  (cd models && .venv/bin/python -m fieldllm_convert shaped-gguf "$shaped.part" && mv "$shaped.part" "$shaped")
fi
[ -f "$cache/llama-1b-shape/manifest.toml" ] || target/release/fieldllmd model import "$shaped" "$cache/llama-1b-shape"
echo "| model | tokens in the KV cache | peak RSS MB | of it at the end: anonymous MB | file-backed MB (mapped weights) | KV cache MB (model info) | prefill tok/s | decode tok/s |"
echo "|---|--:|--:|--:|--:|--:|--:|--:|"
for model in models/build/smollm2-135m-instruct.gguf "$cache/llama-1b-shape"; do
  for ctx in 2048 8192; do
    json=$(target/release/fieldllmd bench --model "$model" --threads 2 --prompt $((ctx - 32)) --gen 16 --reps 1 --json)
    kv=$(target/release/fieldllmd model info "$model" --context "$ctx" | sed -n "s/^KV cache *\([0-9.]*\) MB at $ctx tokens.*/\1/p")
    python3 -c '
import json, sys
r = json.loads(sys.argv[1]); row = r["rows"][-1]
cells = [r["model"], sys.argv[2], "%.0f" % r["peak_rss_mb"], "%.0f" % r["anon_rss_mb"],
         "%.0f" % r["file_rss_mb"], sys.argv[3],
         "%.1f" % row["prefill_tok_s"], "%.1f" % row["decode_tok_s"]]
print("| " + " | ".join(cells) + " |")
' "$json" "$ctx" "$kv"
  done
done
