#!/usr/bin/env bash
# The MQTT service's cost, measured: requests per second and p50/p99 latency through the broker
# against the bare engine (an in-process scheduler) on the tiny model, and the daemon's idle
# CPU and memory; once with mosquitto, once with the embedded broker. Not part of CI. Many
# devices asking at once, on the real model: tests/bench/service_devices.sh.
#
#   tests/bench/service.sh [REQUESTS]      (default 200 per row)
#
# mosquitto runs with set_tcp_nodelay true (MOSQUITTO_EXTRA overrides): with its default, Nagle's
# algorithm on the broker's sockets meets the clients' delayed ACKs and adds ~40 ms to every
# request sent one at a time. rumqttd (the embedded broker) has no such setting.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
requests=${1:-200}
idle_s=${IDLE_S:-30}
# FIELDLLMD_BIN: measure that binary instead of building the release one
if [ -z "${FIELDLLMD_BIN:-}" ]; then
  cargo build --release --locked -p fieldllmd
fi
bin=${FIELDLLMD_BIN:-target/release/fieldllmd}
models/setup.sh "$bin" >/dev/null
model=models/build/tiny-llama
work=$(mktemp -d)
chmod 777 "$work"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

. tests/bench/lib.sh   # free_port, wait_log

# idle CPU (% of one core over $idle_s s) and RSS of a process
idle() {
  local pid=$1 tck t0 t1
  tck=$(getconf CLK_TCK)
  sleep 3
  t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  sleep "$idle_s"
  t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  local rss hwm threads
  rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
  hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
  threads=$(awk '/Threads/{print $2}' "/proc/$pid/status")
  echo "| $2 | $(awk -v d=$((t1 - t0)) -v t="$tck" -v s="$idle_s" 'BEGIN{printf "%.2f", 100*d/t/s}') | $((rss / 1024)) | $((hwm / 1024)) | $threads |"
}

serve() { # name, config text
  printf '%s\n' "$2" > "$work/$1.toml"
  "$bin" serve --config "$work/$1.toml" 2> "$work/$1.log" &
  pids+=($!)
  wait_log "$work/$1.log" "subscribed: taking requests" 20
  echo $! > "$work/$1.pid"
}

echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs"
echo "== $(git rev-parse --short HEAD), $requests requests per row"

# 1. mosquitto
if command -v mosquitto >/dev/null; then
  port=$(free_port)
  printf "listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n${MOSQUITTO_EXTRA-set_tcp_nodelay true}\n" "$port" > "$work/mosquitto.conf"
  mosquitto -c "$work/mosquitto.conf" 2>/dev/null &
  pids+=($!)
  sleep 0.5
  serve mosq "[model]
path = \"$model\"
threads = 1
[mqtt]
broker = \"mqtt://127.0.0.1:$port\"
node_id = \"bench\"
[limits]
queue = 64"
  echo
  echo "### fieldllmd serve + mosquitto (MQTT 5; ${MOSQUITTO_EXTRA-set_tcp_nodelay true})"
  "$bin" bench --service "mqtt://127.0.0.1:$port" --node bench --model "$model" --threads 1 --requests "$requests"
fi

# 2. embedded broker (the zero-config default, on another port)
eport=$(free_port)
serve embedded "[model]
path = \"$model\"
threads = 1
[mqtt]
embedded_listen = \"127.0.0.1:$eport\"
node_id = \"bench\"
[limits]
queue = 64"
echo
echo "### fieldllmd serve with its embedded broker (MQTT 3.1.1)"
"$bin" bench --service "mqtt://127.0.0.1:$eport" --node bench --model "$model" --threads 1 --requests "$requests"

echo
echo "### idle daemon, ${idle_s} s after the runs above (tiny model)"
echo "| daemon | CPU % of one core | RSS MB | peak RSS MB | threads |"
echo "|---|--:|--:|--:|--:|"
[ -f "$work/mosq.pid" ] && idle "$(cat "$work/mosq.pid")" "with mosquitto"
idle "$(cat "$work/embedded.pid")" "with embedded broker"
