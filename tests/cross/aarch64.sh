#!/usr/bin/env bash
# Cross-builds the workspace for aarch64-unknown-linux-gnu (rustup's target, Debian's
# gcc-aarch64-linux-gnu as linker and C compiler) and runs the engine, protocol and bridge tests
# under qemu-aarch64-static. Release profile, but without its cross-crate (thin) LTO: each final
# link re-optimizes all of tract, about 10 minutes apiece on 2 cores for the three this builds
# (the binary and two test binaries); CI hit its limit during them. LTO changes inlining,
# not what the kernels compute. Prints the stripped binary's size (the shipped, LTO-linked one
# is smaller). Needs models/build/tiny-llama (models/setup.sh).
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
export CARGO_PROFILE_RELEASE_LTO=false
start=$(date +%s)
cargo test --release --locked --target "$target" -p fieldllm-proto -p firmware-bridge
cargo test --release --locked --target "$target" -p fieldllmd --lib --test engine_tiny
bin=target/$target/release/fieldllmd
file "$bin" | grep -q 'ARM aarch64' || { echo "not an aarch64 binary: $(file "$bin")" >&2; exit 1; }

# The deployed model through the aarch64 kernels under qemu: the i8mm kernel (prefill tiles,
# decode's value + remainder rows) must give the sdot kernel's perplexity to the last bit, and
# both must be within 1% of this machine's (x86) on the same text. Needs models/setup.sh's gguf
# artifact; skipped without it.
gguf=models/build/smollm2-135m-instruct.gguf
if [ -e "$gguf/manifest.toml" ]; then
  ppl() { # ppl BINARY [RUNNER...]: the JSON perplexity of the passage's first 128 tokens
    "$@" bench --model "$gguf" --perplexity models/passage.txt --ctx 128 --chunks 1 --json \
      2>/dev/null | sed -n 's/.*"perplexity": *\([0-9.e+-]*\).*/\1/p'
  }
  host_bin=${FIELDLLMD_BIN:-}
  for b in target/release/fieldllmd target/debug/fieldllmd; do
    [ -z "$host_bin" ] && [ -x "$b" ] && host_bin=$b
  done
  declare -A got
  for isa in neon-dotprod neon-i8mm; do
    got[$isa]=$(FIELDLLM_ISA=$isa ppl qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin")
    echo "aarch64 $isa: perplexity ${got[$isa]}"
  done
  [ -n "${got[neon-i8mm]}" ] && [ "${got[neon-i8mm]}" = "${got[neon-dotprod]}" ] || {
    echo "i8mm and sdot kernels disagree on the model: ${got[neon-i8mm]} vs ${got[neon-dotprod]}" >&2
    exit 1
  }
  if [ -n "$host_bin" ]; then
    host=$(ppl "$host_bin")
    echo "host ($host_bin): perplexity $host"
    python3 -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(abs(a / b - 1) > 0.01)" \
      "${got[neon-i8mm]}" "$host" || {
      echo "aarch64 perplexity ${got[neon-i8mm]} is not within 1% of the host's $host" >&2
      exit 1
    }
  fi
else
  echo "no $gguf: model check skipped (models/setup.sh makes it)"
fi

aarch64-linux-gnu-strip -o "target/$target/fieldllmd.stripped" "$bin"
echo "aarch64: stripped fieldllmd (no LTO) $(stat -c %s "target/$target/fieldllmd.stripped") bytes; build and tests $(( $(date +%s) - start )) s"
