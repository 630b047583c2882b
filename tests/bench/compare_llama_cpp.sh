#!/usr/bin/env bash
# Side-by-side benchmark: fieldllmd's deployed SmolLM2 artifact against llama.cpp on the same
# GGUF, same machine, same run. Not part of CI (it builds llama.cpp: a few minutes).
#
#   tests/bench/compare_llama_cpp.sh [THREADS...]      (default: 1 2)
#   FIELDLLM_WEIGHTS=f16 tests/bench/compare_llama_cpp.sh   (the f16 artifact instead of gguf)
#
# llama.cpp comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp), built with
# Debian's cmake into tests/bench/.cache (ignored). Prefill is pp128, decode tg128, as
# llama-bench defines them; peak RSS is /usr/bin/time's maximum resident set of one run of each
# engine at the largest thread count.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache="$root/tests/bench/.cache"
threads=("${@:-1 2}")
threads=(${threads[*]})
llama_version=0.3.36
sudo=; [ "$(id -u)" -ne 0 ] && sudo=sudo

for tool in cmake:cmake /usr/bin/time:time g++:g++; do
  command -v "${tool%%:*}" >/dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${tool##*:}"; }
done

cd "$root"
cargo build --release --locked -p fieldllmd
models/setup.sh target/release/fieldllmd
gguf=$(models/fetch.sh)
artifact=models/build/smollm2-135m-instruct.${FIELDLLM_WEIGHTS:-gguf}

. tests/bench/llama_cpp.sh   # builds llama.cpp: $bench_bin, $ppl_bin, $quant_bin

tmax=${threads[-1]}
tcsv=$(IFS=,; echo "${threads[*]}")
out="$cache/run-$(date +%Y%m%dT%H%M%S)"
mkdir -p "$out"
targs=(); for t in "${threads[@]}"; do targs+=(--threads "$t"); done

# alternate the engines so a slow moment of the machine hits both
"$bench_bin" -m "$gguf" -p 128 -n 128 -t "$tcsv" -r 3 -o json > "$out/llama.json"
target/release/fieldllmd bench --model "$artifact" "${targs[@]}" --reps 3 --json > "$out/fieldllm.json"
/usr/bin/time -f '%M' -o "$out/llama.rss" "$bench_bin" -m "$gguf" -p 128 -n 128 -t "$tmax" -r 1 -o json > /dev/null
/usr/bin/time -f '%M' -o "$out/fieldllm.rss" target/release/fieldllmd bench --model "$artifact" --threads "$tmax" --reps 1 --json > /dev/null
# quality: llama-perplexity's measure on the same text and context, both engines
ppl_text=${FIELDLLM_PPL_TEXT:-$root/LICENSE}
"$ppl_bin" -m "$gguf" -f "$ppl_text" -c 512 -t "$tmax" 2>&1 | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' > "$out/llama.ppl"
target/release/fieldllmd bench --model "$artifact" --perplexity "$ppl_text" --ctx 512 --threads "$tmax" \
  --kl-divergence models/build/smollm2-135m-instruct --json > "$out/fieldllm.ppl.json"
# load: process start to model ready, llama.cpp's from its own timing of a 1-token run
python3 - "$out" "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" <<'PY'
import json, sys
out, ncpu, cpu = sys.argv[1], sys.argv[2], sys.argv[3].strip()
ll = json.load(open(f"{out}/llama.json"))
fl = json.load(open(f"{out}/fieldllm.json"))
def llama(t, kind):
    for r in ll:
        if r["n_threads"] == t and ((kind == "pp" and r["n_prompt"] > 0 and r["n_gen"] == 0) or (kind == "tg" and r["n_gen"] > 0 and r["n_prompt"] == 0)):
            return r["avg_ts"]
    return float("nan")
rss_l = int(open(f"{out}/llama.rss").read().split()[-1]) / 1024
rss_f = int(open(f"{out}/fieldllm.rss").read().split()[-1]) / 1024
print(f"machine: {cpu}, {ncpu} CPUs; model: SmolLM2-135M-Instruct; fieldllmd {fl['weights']} artifact vs llama.cpp Q4_1 GGUF")
print("| threads | test | llama.cpp tok/s | fieldllmd tok/s | ratio |")
print("|--:|---|--:|--:|--:|")
for row in fl["rows"]:
    t = row["threads"]
    for kind, key in (("pp", "prefill_tok_s"), ("tg", "decode_tok_s")):
        l, f = llama(t, kind), row[key]
        print(f"| {t} | {kind}128 | {l:.1f} | {f:.1f} | {f / l:.2f}x |")
print(f"| - | peak RSS MB | {rss_l:.0f} | {rss_f:.0f} | {rss_f / rss_l:.2f}x |")
print(f"| - | fieldllmd load ms | - | {fl['rows'][-1]['load_ms']:.0f} | - |")
pl = float(open(f"{out}/llama.ppl").read().strip() or "nan")
pf = json.load(open(f"{out}/fieldllm.ppl.json"))
print(f"| - | perplexity (ctx 512, {pf['chunks']} chunks) | {pl:.4f} | {pf['perplexity']:.4f} | {pf['perplexity'] / pl:.4f}x |")
r = pf["reference"]
print(f"fieldllmd vs its f32 model: f32 perplexity {r['perplexity']:.4f}, mean KLD {r['mean_kld']:.6f}, same top-1 {r['same_top1_pct']:.2f}%")
PY
echo "raw results: $out"
