#!/usr/bin/env bash
# Checks the layer: fieldllmd-crates.inc matches Cargo.lock, and oelint-adv (PyPI, pinned,
# in a cached venv) reports nothing for scarthgap. tests/run.sh runs it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python3 "$here/scripts/gen-crates-inc.py" --check
venv=${FIELDLLM_OELINT_VENV:-$HOME/.cache/fieldllm/oelint-venv}
if [ ! -x "$venv/bin/oelint-adv" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q oelint-adv==9.11.2
fi
mapfile -t recipes < <(find "$here" -name '*.bb' -o -name '*.bbappend' -o -name '*.inc' | sort)
# --quiet: findings only; any finding is a non-zero exit
"$venv/bin/oelint-adv" --quiet --release scarthgap "${recipes[@]}"
echo "meta-fieldllm: crates.inc current, oelint-adv clean (${#recipes[@]} files)"
