#!/usr/bin/env bash
# A fleet asking at once, over MQTT (issue 19): DEVICES devices (default 8), each on its own
# connection to mosquitto asking one question at a time (up to GEN tokens, greedy), against a
# `fieldllmd serve` of SmolLM2 (Q4_1) at THREADS threads, with the settings before and after
# answers were decoded together:
#   slots = 1                  one answer at a time (the default before issue 19)
#   slots = 4, batch = false   four answers, each on a state of its own (reading every weight)
#   slots = 4                  four answers decoded together (the default now)
#   slots = 8                  eight decoded together
# requests/s and p50/p99 latency per row (`fieldllmd bench --service --mqtt-only`), one device
# alone and DEVICES at once. Not part of CI (minutes of load).
#
#   tests/bench/service_devices.sh [REQUESTS]     (default 40 per row; DEVICES=8 GEN=64 THREADS=2)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
requests=${1:-40}
devices=${DEVICES:-8}
gen=${GEN:-64}
threads=${THREADS:-2}
if [ -z "${FIELDLLMD_BIN:-}" ]; then
  cargo build --release --locked -p fieldllmd
fi
bin=${FIELDLLMD_BIN:-target/release/fieldllmd}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
# the GGUF as a user's `fieldllmd model import` makes it
model="$work/smollm2-q4_1"
"$bin" model import "$(models/fetch.sh)" "$model" >/dev/null

. tests/bench/lib.sh   # free_port, wait_log

port=$(free_port)
printf "listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n" "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" 2>/dev/null &
pids+=($!)
sleep 0.5

echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs"
echo "== $(git rev-parse --short HEAD), SmolLM2 Q4_1, $threads threads, up to $gen tokens an answer, $requests requests per row"
echo
echo "| daemon | devices | req/s | p50 ms | p99 ms | peak RSS MB |"
echo "|---|--:|--:|--:|--:|--:|"
row() { # label, extra [model] lines
  local node="dev$RANDOM"
  printf '[model]\npath = "%s"\nthreads = %s\n%b\n[mqtt]\nbroker = "mqtt://127.0.0.1:%s"\nnode_id = "%s"\n[limits]\nqueue = 64\nmax_tokens = %s\n' \
    "$model" "$threads" "$2" "$port" "$node" "$gen" > "$work/$node.toml"
  "$bin" serve --config "$work/$node.toml" 2> "$work/$node.log" &
  local pid=$!
  wait_log "$work/$node.log" "subscribed: taking requests" 60
  "$bin" bench --service "mqtt://127.0.0.1:$port" --node "$node" --model "$model" --mqtt-only \
    --concurrency 1 --concurrency "$devices" --requests "$requests" --max-tokens "$gen" --json > "$work/$node.json"
  local hwm
  hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$work/$node.json" "$1" "$((hwm / 1024))" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for row in r["rows"]:
    print(f"| {sys.argv[2]} | {row['concurrency']} | {row['rps']:.2f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {sys.argv[3]} |")
EOF
}
row "slots = 1 (before)" "slots = 1"
row "slots = 4, batch = false (before, 4 slots)" "slots = 4\nbatch = false"
row "slots = 4 (now)" "slots = 4"
row "slots = 8" "slots = 8"
