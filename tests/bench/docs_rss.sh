#!/usr/bin/env bash
# The daemon's resident memory with the document library open, against the same daemon with
# `[docs] enabled = false`: after start-up, and after the same questions (grounded with the
# library; without it, the same passages pasted into the prompt, so the LLM's prompts are of
# the same length and only the library's own memory differs). SmolLM2, tests/corpus indexed
# by `docs add`, the embedded broker. Not part of CI.
#
#   tests/bench/docs_rss.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
if [ -z "${FIELDLLMD_BIN:-}" ]; then
  cargo build --release --locked -p fieldllmd
fi
bin=${FIELDLLMD_BIN:-target/release/fieldllmd}
models/setup.sh "$bin" >/dev/null
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

. tests/bench/lib.sh   # free_port, wait_log
rss_mb() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

mkdir -p "$work/files"
cp tests/corpus/*.md tests/corpus/*.txt "$work/files/"
"$bin" docs --index "$work/index" --embedder models/build/all-minilm-l6-v2 add "$work/files" >/dev/null
questions=(
  "What is the setting of the main relief valve?"
  "How tight should the relief valve lock nut be?"
  "Which hydraulic oil grade does the power unit take?"
  "My hydraulic pump is making a grinding noise and the pressure drops. What should I check first?"
)

echo "| [docs] | RSS after start MB | after ${#questions[@]} questions MB |"
echo "|---|--:|--:|"
for enabled in false true; do
  port=$(free_port)
  cat >"$work/$enabled.toml" <<EOF
[model]
path = "$root/models/build/smollm2-135m-instruct.gguf"
[mqtt]
broker = "embedded"
embedded_listen = "127.0.0.1:$port"
[docs]
enabled = $enabled
index = "$work/index"
embedder = "$root/models/build/all-minilm-l6-v2"
EOF
  RUST_LOG=info "$bin" serve --no-console --config "$work/$enabled.toml" 2>"$work/$enabled.log" &
  pid=$!
  wait_log "$work/$enabled.log" "serving" 30
  sleep 1
  started=$(rss_mb "$pid")
  for q in "${questions[@]}"; do
    if [ "$enabled" = true ]; then
      "$bin" ask --via "mqtt://127.0.0.1:$port" --docs --max-tokens 32 "$q" >/dev/null
    else
      # the passage the grounded question gets, pasted: a prompt of the same length
      passage=$("$bin" docs --index "$work/index" --embedder models/build/all-minilm-l6-v2 search --k 1 "$q" | tr '\n' ' ')
      "$bin" ask --via "mqtt://127.0.0.1:$port" --max-tokens 32 "Manual excerpt: $passage Question: $q" >/dev/null
    fi
  done
  echo "| enabled = $enabled | $started | $(rss_mb "$pid") |"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
done
