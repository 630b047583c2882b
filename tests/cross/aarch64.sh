#!/usr/bin/env bash
# Cross-builds the workspace for aarch64-unknown-linux-gnu (rustup's target, Debian's
# gcc-aarch64-linux-gnu as linker and C compiler) and runs the engine, protocol and bridge tests
# under qemu-aarch64-static. Release profile: the tests and the shipped binary are one build.
# Prints the stripped binary's size. Needs models/build/tiny-llama (models/setup.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
start=$(date +%s)
cargo test --release --locked --target "$target" -p fieldllm-proto -p firmware-bridge
cargo test --release --locked --target "$target" -p fieldllmd --lib --test engine_tiny
bin=target/$target/release/fieldllmd
file "$bin" | grep -q 'ARM aarch64' || { echo "not an aarch64 binary: $(file "$bin")" >&2; exit 1; }
aarch64-linux-gnu-strip -o "target/$target/fieldllmd.stripped" "$bin"
echo "aarch64: stripped fieldllmd $(stat -c %s "target/$target/fieldllmd.stripped") bytes; build and tests $(( $(date +%s) - start )) s"
