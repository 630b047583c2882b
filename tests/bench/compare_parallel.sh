#!/usr/bin/env bash
# Answers started together (issue 19): fieldllm's answers decoded together, fieldllm's answers
# each on a state of its own (as before), and llama.cpp's llama-server with --parallel N
# (continuous batching), on the same GGUF, same machine, same run: N = 1, 2, 4, 8 answers of up
# to GEN tokens, greedy, the same four questions, aggregate and per-answer tok/s, time to first
# token, longest gap between tokens, memory. Not part of CI (it builds llama.cpp).
#
#   tests/bench/compare_parallel.sh [GEN]      (default 128; THREADS=2)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache="$root/tests/bench/.cache"
llama_version=0.3.36
gen=${1:-128}
threads=${THREADS:-2}
levels=(1 2 4 8)
cd "$root"
cargo build --release --locked -p fieldllmd
models/setup.sh target/release/fieldllmd >/dev/null
gguf=$(models/fetch.sh)
. tests/bench/llama_cpp.sh   # $server_bin
out="$cache/parallel-$(date +%Y%m%dT%H%M%S)"
mkdir -p "$out"
# the GGUF as a user's `fieldllmd model import` makes it (the Rust import: its blocks kept, the
# rotary embedding one op), not the artifact of the converter's ONNX graph
artifact="$out/artifact"
target/release/fieldllmd model import "$gguf" "$artifact" > "$out/import.log"
. tests/bench/lib.sh   # free_port, wait_log

pargs=(); for n in "${levels[@]}"; do pargs+=(--parallel "$n"); done
target/release/fieldllmd bench --model "$artifact" --threads "$threads" "${pargs[@]}" --gen "$gen" \
  --json > "$out/fieldllm.json"
target/release/fieldllmd bench --model "$artifact" --threads "$threads" "${pargs[@]}" --gen "$gen" \
  --separate --json > "$out/fieldllm-separate.json"
: > "$out/llama-server.jsonl"
for n in "${levels[@]}"; do
  port=$(free_port)
  # a slot holds 1024 tokens, as each of fieldllm's answers may
  "$server_bin" -m "$gguf" -t "$threads" -tb "$threads" --parallel "$n" -c $((n * 1024)) \
    --host 127.0.0.1 --port "$port" > "$out/server-$n.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health')" 2>/dev/null && break
    sleep 0.2
  done
  row=$(python3 tests/bench/parallel_client.py "$port" "$gen" "$n")
  hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); r['peak_rss_mb']=int(sys.argv[2])/1000; print(json.dumps(r))" "$row" "$hwm" >> "$out/llama-server.jsonl"
done

python3 - "$out" "$threads" "$gen" <<'PY'
import json, sys, os
out, threads, gen = sys.argv[1], sys.argv[2], sys.argv[3]
ours = json.load(open(os.path.join(out, "fieldllm.json")))
sep = json.load(open(os.path.join(out, "fieldllm-separate.json")))
srv = [json.loads(l) for l in open(os.path.join(out, "llama-server.jsonl"))]
print(f"SmolLM2-135M-Instruct Q4_1, {threads} threads, N answers of up to {gen} tokens started together ({out})")
print("| N | engine | aggregate tok/s | aggregate decode tok/s | per-answer tok/s | TTFT p50 ms | TTFT max ms | longest gap ms | memory MB |")
print("|--:|---|--:|--:|--:|--:|--:|--:|--:|")
for i, n in enumerate(r["answers"] for r in ours["rows"]):
    for name, r, mem in [("fieldllm, decoded together", ours["rows"][i], ours["rows"][i]["rss_mb"]),
                         ("fieldllm, each alone", sep["rows"][i], sep["rows"][i]["rss_mb"]),
                         ("llama-server", srv[i], srv[i]["peak_rss_mb"])]:
        print(f"| {n} | {name} | {r['aggregate_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['per_answer_tok_s']:.1f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_max_ms']:.0f} | {r['max_gap_ms']:.0f} | {mem:.0f} |")
one, one_d = ours["rows"][0]["aggregate_tok_s"], ours["rows"][0]["decode_tok_s"]
for i, r in enumerate(ours["rows"]):
    print(f"N={r['answers']}: aggregate {r['aggregate_tok_s'] / one:.2f}x our N=1, "
          f"{r['aggregate_tok_s'] / srv[i]['aggregate_tok_s']:.2f}x llama-server's; "
          f"aggregate decode {r['decode_tok_s'] / one_d:.2f}x our N=1, "
          f"{r['decode_tok_s'] / srv[i]['decode_tok_s']:.2f}x llama-server's")
for st in ours.get("stall", []):
    print(f"prompt chunk {st['chunk']}: a ~500-token prompt joining 3 answers: their median gap "
          f"{st['median_gap_ms']:.0f} ms, longest {st['longest_gap_ms']:.0f} ms; its TTFT {st['joiner_ttft_ms']:.0f} ms")
print("memory: fieldllm's is its resident set after the level (the weights are mapped: file-backed); "
      "llama-server's its peak")
PY
