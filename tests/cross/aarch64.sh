#!/usr/bin/env bash
# Cross-builds the engine, protocol and bridge crates for aarch64-unknown-linux-gnu (rustup's
# target, Debian's gcc-aarch64-linux-gnu as linker and C compiler) and runs their tests under
# qemu-aarch64-static, every kernel instruction set included; then runs the deployed model
# there and checks its perplexity against this machine's. The daemon's async stack (tokio,
# rumqttd, rustls, the CLI) is not built: nothing here runs it, and the engine is where the
# target matters (SIMD kernels, tract's aarch64 kernels).
#
# The test profile, as the host's tests: the engine and what a model runs through optimized,
# debug assertions on. It shares the host build's target directory, so the host-side crates (proc
# macros, build scripts and their dependencies) built for the host's tests are not built again.
# Needs models/setup.sh's tiny model and gguf artifact, and the host's fieldllm-perplexity
# (target/debug, built by the host's `cargo test --workspace --no-run`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
# qemu's "max" CPU has NEON, dotprod and i8mm, so every aarch64 kernel runs in the tests;
# the kernel test fails if one of these is not detected rather than skip it
export QEMU_CPU=max
export FIELDLLM_TEST_ISAS=scalar,neon,neon-dotprod,neon-i8mm
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
start=$(date +%s)
# one invocation, so the three crates' dependencies are resolved (and built) once; the SmolLM2
# engine tests stay the host's (minutes under qemu)
cargo test --locked --target "$target" \
  -p fieldllm-proto -p firmware-bridge -p fieldllm-engine \
  --lib --bins --examples --test engine_tiny --test controls --test fixtures
echo "aarch64: built and tested in $(( $(date +%s) - start )) s"
bin=target/$target/debug/fieldllm-perplexity
file "$bin" | grep -q 'ARM aarch64' || { echo "not an aarch64 binary: $(file "$bin")" >&2; exit 1; }

# The deployed model through the aarch64 kernels under qemu. The i8mm kernel (prefill tiles,
# decode's value + remainder rows) forms the sdot kernel's integer sums and scales them in the
# same f32 operations: the two must give the same perplexity to the last bit.
gguf=models/build/smollm2-135m-instruct.gguf
[ -e "$gguf/manifest.toml" ] || { echo "no $gguf: run models/setup.sh first" >&2; exit 1; }
ppl() { # ppl PERPLEXITY_BINARY [RUNNER...]: the perplexity of the passage's first 128 tokens
  "$@" "$gguf" models/passage.txt 128 1
}
# The two runs side by side: each keeps about one core busy under qemu (211 s for both here,
# against 377 s one after the other).
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
for isa in neon-dotprod neon-i8mm; do
  FIELDLLM_ISA=$isa ppl qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" > "$out/$isa" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
declare -A got
for isa in neon-dotprod neon-i8mm; do
  got[$isa]=$(cat "$out/$isa")
  echo "aarch64 $isa: perplexity ${got[$isa]}"
done
[ -n "${got[neon-i8mm]}" ] && [ "${got[neon-i8mm]}" = "${got[neon-dotprod]}" ] || {
  echo "i8mm and sdot kernels disagree on the model: ${got[neon-i8mm]} vs ${got[neon-dotprod]}" >&2
  exit 1
}
# Against this machine: the same text through x86's kernels and tract's x86 code. Rounding
# differs between them (the order of f32 additions, FMA or not), and over the 64 positions
# scored here it moves the perplexity by up to 1.2% (measured on this passage: x86 AVX2
# 59.52, x86 scalar 59.18, x86 AVX-512 VNNI 58.90, aarch64 58.83); a kernel that computes
# something else moves it by far more. The kernels themselves are checked against the
# scalar reference (to 1e-4 of each value) by the unit tests above.
host_bin=${FIELDLLM_HOST_PERPLEXITY:-target/debug/fieldllm-perplexity}
[ -x "$host_bin" ] || { echo "no host $host_bin: build the workspace's tests first" >&2; exit 1; }
host=$(ppl "$host_bin")
echo "host ($host_bin): perplexity $host"
python3 -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(abs(a / b - 1) > 0.03)" \
  "${got[neon-i8mm]}" "$host" || {
  echo "aarch64 perplexity ${got[neon-i8mm]} is not within 3% of the host's $host" >&2
  exit 1
}
echo "aarch64: done in $(( $(date +%s) - start )) s"
