#!/usr/bin/env bash
# The whole test suite: build the workspace's tests (every target), make the model packages the
# tests use (tiny model, SmolLM2 package + NumPy reference, gguf and f16 artifacts), then every
# test of the workspace, the systemd boot test and the Yocto layer's lint; each step says when
# it started. Extra arguments go to `cargo test`.
# Needs mosquitto (Debian package) for the MQTT tests, and root with debootstrap and
# systemd-container for the boot test; .ci/run installs them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
step() { echo "=== tests/run.sh: $* (at $(( $(date +%s) - start )) s)"; }
mkdir -p target
# the Python half of models/setup.sh (venv, fetch, conversion, NumPy references) needs no
# build: it runs beside it
step "models/setup.sh --packages and models/fetch-vocabs.sh, in the background"
# fetch-vocabs.sh: llama.cpp's tokenizer test vocabularies, test data only (not in setup.sh,
# so the first command does not download them)
{ models/setup.sh --packages && PYTHON=models/.venv/bin/python models/fetch-vocabs.sh; } \
  > target/models-setup.log 2>&1 &
packages=$!
step "build the workspace's tests"
# through `cargo test`, so the binary has the test build's features: a separate `cargo build`
# resolves features without dev-dependencies and builds tract a second time
cargo test --workspace --all-targets --locked --no-run
export FIELDLLMD_BIN="$PWD/target/debug/fieldllmd"
step "models/setup.sh (the imports)"
wait "$packages" || { cat target/models-setup.log >&2; exit 1; }
cat target/models-setup.log
models/setup.sh "$FIELDLLMD_BIN"
# the kernel tests must run the SIMD kernels, not compare the reference with itself: on
# x86-64 they fail unless AVX2 (every machine CI runs on has it) is detected and tested;
# AVX-512 VNNI is tested where the CPU has it. tests/cross/aarch64.sh lists the ARM ones.
case "$(uname -m)" in
  x86_64) export FIELDLLM_TEST_ISAS=${FIELDLLM_TEST_ISAS-scalar,avx2} ;;
esac
step "cargo test --workspace"
cargo test --workspace --locked "$@"
# fieldllmd under a real systemd (debootstrap + systemd-nspawn; root only)
step "tests/boot/run.sh"
tests/boot/run.sh "$FIELDLLMD_BIN"
# rust-version is what the dependencies need, no more and no less (tests/msrv.py says how)
step "rust-version"
python3 tests/msrv.py
# the Yocto layer: crate list current, oelint-adv clean
step "yocto lint"
yocto/meta-fieldllm/scripts/lint.sh
step "done"
