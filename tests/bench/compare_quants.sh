#!/usr/bin/env bash
# Side by side with llama.cpp on files it made (issue 18): SmolLM2's GGUF requantized by
# llama.cpp's own llama-quantize (--allow-requantize) to Q4_0, Q5_0, Q8_0 and Q4_K_M; each file
# imported by fieldllmd in Rust (`model import FILE.gguf`, its blocks kept as they are), then
# for both engines on the same file: perplexity on the same text and context
# (llama-perplexity's measure), and prefill (pp128) / decode (tg128) tok/s at THREADS (default
# 2) with llama-bench and `fieldllmd bench`. Not part of CI (it builds llama.cpp: minutes).
#
#   tests/bench/compare_quants.sh [THREADS]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache="$root/tests/bench/.cache"
threads=${1:-2}
llama_version=0.3.36
cd "$root"
cargo build --release --locked -p fieldllmd
models/setup.sh target/release/fieldllmd >/dev/null
gguf=$(models/fetch.sh)
. tests/bench/llama_cpp.sh
out="$cache/quants-$(date +%Y%m%dT%H%M%S)"
mkdir -p "$out"
text=${FIELDLLM_PPL_TEXT:-$root/LICENSE}
for q in Q4_0 Q5_0 Q8_0 Q4_K_M; do
  file="$out/smollm2-$q.gguf"
  "$quant_bin" --allow-requantize "$gguf" "$file" "$q" > "$out/$q.quantize.log" 2>&1
  target/release/fieldllmd model import "$file" "$out/$q.artifact" > "$out/$q.import.log"
  "$ppl_bin" -m "$file" -f "$text" -c 512 -t "$threads" 2>&1 \
    | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' > "$out/$q.llama.ppl"
  target/release/fieldllmd bench --model "$out/$q.artifact" --perplexity "$text" --ctx 512 \
    --threads "$threads" --json > "$out/$q.fieldllm.ppl.json"
  # alternate the engines so a slow moment of the machine hits both
  "$bench_bin" -m "$file" -p 128 -n 128 -t "$threads" -r 3 -o json > "$out/$q.llama.json"
  target/release/fieldllmd bench --model "$out/$q.artifact" --threads "$threads" --reps 3 --json \
    > "$out/$q.fieldllm.json"
done
python3 - "$out" "$threads" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" <<'PY'
import json, os, sys
out, threads, cpu = sys.argv[1], int(sys.argv[2]), sys.argv[3].strip()
print(f"machine: {cpu}, {os.cpu_count()} CPUs; SmolLM2-135M-Instruct requantized by llama-quantize; {threads} threads")
print("| file | tensor types | perplexity llama.cpp | fieldllmd | ratio | pp128 llama.cpp | fieldllmd | ratio | tg128 llama.cpp | fieldllmd | ratio |")
print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
for q in ["Q4_0", "Q5_0", "Q8_0", "Q4_K_M"]:
    ll = json.load(open(f"{out}/{q}.llama.json"))
    fl = json.load(open(f"{out}/{q}.fieldllm.json"))["rows"][-1]
    pp = [r["avg_ts"] for r in ll if r["n_prompt"] > 0 and r["n_gen"] == 0][0]
    tg = [r["avg_ts"] for r in ll if r["n_gen"] > 0 and r["n_prompt"] == 0][0]
    pl = float(open(f"{out}/{q}.llama.ppl").read().strip() or "nan")
    pf = json.load(open(f"{out}/{q}.fieldllm.ppl.json"))["perplexity"]
    m = dict(l.split(" = ", 1) for l in open(f"{out}/{q}.artifact/manifest.toml").read().splitlines() if " = " in l)
    types = m.get("quantization", "?").strip('"')
    print(f"| {q} | {types} | {pl:.4f} | {pf:.4f} | {pf / pl:.4f} | {pp:.1f} | {fl['prefill_tok_s']:.1f} | "
          f"{fl['prefill_tok_s'] / pp:.2f}x | {tg:.1f} | {fl['decode_tok_s']:.1f} | {fl['decode_tok_s'] / tg:.2f}x |")
PY
echo "raw results: $out"
