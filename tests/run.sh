#!/usr/bin/env bash
# The whole test suite: build fieldllmd, make the model packages the tests use (tiny model,
# SmolLM2 package + NumPy reference, gguf and f16 artifacts), then every test of the workspace.
# Extra arguments go to `cargo test`.
# Needs mosquitto (Debian package) for the MQTT tests, and root with debootstrap and
# systemd-container for the boot test; .ci/run installs them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# build through `cargo test` so the binary has the test build's features: a separate
# `cargo build` resolves features without dev-dependencies and rebuilds tract a second time
cargo test --workspace --locked --no-run
export FIELDLLMD_BIN="$PWD/target/debug/fieldllmd"
models/setup.sh "$FIELDLLMD_BIN"
cargo test --workspace --locked "$@"
# fieldllmd under a real systemd (debootstrap + systemd-nspawn; root only)
tests/boot/run.sh "$FIELDLLMD_BIN"
# the Yocto layer: crate list current, oelint-adv clean
yocto/meta-fieldllm/scripts/lint.sh
