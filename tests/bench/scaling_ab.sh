#!/usr/bin/env bash
# Issue 19's scaling target, N = 4 answers' aggregate decode tok/s against one answer's, for
# one or more fieldllmd binaries interleaved round by round (this VM's host moves a single run
# by 15% or more, so one run of each says little): ROUNDS rounds of `fieldllmd bench --parallel
# 1 --parallel 4 --gen 128` per binary, then each binary's medians and the median ratio. Not
# part of CI.
#
#   tests/bench/scaling_ab.sh MODEL ROUNDS BIN [BIN...]
#   (MODEL: an artifact, e.g. `fieldllmd model import models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
#   /tmp/smol`; THREADS=2)
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,11p "$0"; exit 2; }
model=$1 rounds=$2
shift 2
threads=${THREADS:-2}
raw=$(mktemp)
trap 'rm -f "$raw"' EXIT
for _ in $(seq "$rounds"); do
  for bin in "$@"; do
    "$bin" bench --model "$model" --threads "$threads" --parallel 1 --parallel 4 --gen 128 \
      2>/dev/null | awk -v b="$bin" -F'|' '/^\| [14] \|/ { gsub(/ /, "", $2); gsub(/ /, "", $6); print b, $2, $6 }'
  done
done > "$raw"
python3 - "$raw" "$@" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for b in sys.argv[2:]:
    n1 = [float(t) for x, n, t in rows if x == b and n == "1"]
    n4 = [float(t) for x, n, t in rows if x == b and n == "4"]
    if not n1 or len(n1) != len(n4):
        sys.exit(f"{b}: no complete rounds")
    r = [y / x for x, y in zip(n1, n4)]
    print(f"{b}: N=1 median {statistics.median(n1):.1f} tok/s, N=4 median "
          f"{statistics.median(n4):.1f}, N=4/N=1 median {statistics.median(r):.2f} "
          f"({min(r):.2f}-{max(r):.2f}), {len(r)} rounds")
PY
