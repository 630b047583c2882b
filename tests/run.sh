#!/usr/bin/env bash
# The whole test suite: build fieldllmd, make the model packages the tests use (tiny model,
# SmolLM2 package + NumPy reference, f16 artifact), then every test of the workspace.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --locked -p fieldllmd
models/setup.sh target/debug/fieldllmd
cargo test --workspace --locked "$@"
