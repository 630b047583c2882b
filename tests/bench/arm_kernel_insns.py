#!/usr/bin/env python3
"""Instructions the aarch64 matrix kernels execute per token, per instruction set, counted under
qemu: where no ARM machine is at hand, a count is what can be compared (qemu's timings say
nothing of a real core's, and it emulates `smmla` and `sdot` with helper calls).

    tests/bench/arm_kernel_insns.py [--model DIR] [--isa NAME ...]

Runs the aarch64 `fieldllmd bench` (tests/cross/aarch64.sh builds it) on the deployed artifact
under `qemu-aarch64-static -cpu max -d exec,nochain`, which logs every translated block run,
filtered to the kernels' addresses (`-dfilter`, the `engine::ggml::kernel` functions from
`nm`), once with a 4-token prompt and once with 1; each block is expanded into its instructions
from the binary's disassembly (a block runs to its first branch, at most 512 instructions, never
across a 4 KiB page) and counted by mnemonic. `--check` compares that expansion with qemu's
`-singlestep` (one instruction per block) on a small kernel test, to show the two agree. Both runs feed two
more single tokens (bench's decode test), so a decode token is the 1-token run / 3, and a
prefill token (4-token prompt) is (4-token run - 2 decode tokens) / 4. Every product of the
model counts (q/k/v/o, MLP, LM head), activation quantization and attention do not.
"""
import argparse
import collections
import os
import re
import subprocess
import sys

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
target = "aarch64-unknown-linux-gnu"
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=f"{root}/models/build/smollm2-135m-instruct.gguf")
ap.add_argument("--isa", action="append", help="default: neon, neon-dotprod, neon-i8mm")
ap.add_argument("--bin", default=f"{root}/target/{target}/release/fieldllmd")
ap.add_argument("--check", metavar="LIB_TEST_BINARY",
                help="instead: count one kernel test both ways (the lib test binary)")
args = ap.parse_args()
if args.check:
    args.bin = args.check
isas = args.isa or ["neon", "neon-dotprod", "neon-i8mm"]
if not os.access(args.bin, os.X_OK):
    sys.exit(f"{args.bin} missing: run tests/cross/aarch64.sh first")

# qemu-user maps a position-independent aarch64 executable at this address
BASE = 0x5500000000
syms = subprocess.run(
    ["aarch64-linux-gnu-nm", "-C", "-S", "--defined-only", args.bin],
    check=True, capture_output=True, text=True,
).stdout
ranges = []
for line in syms.splitlines():
    parts = line.split(maxsplit=3)
    if len(parts) == 4 and parts[2] in "tT" and "engine::ggml::kernel::" in parts[3] \
            and "Isa" not in parts[3]:
        start, size = int(parts[0], 16), int(parts[1], 16)
        if size:
            ranges.append((start, size))
if not ranges:
    sys.exit("no kernel symbols found (stripped binary?)")

# mnemonic of every kernel instruction, by address
mnemonic = {}
for start, size in ranges:
    out = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn",
         f"--start-address={start:#x}", f"--stop-address={start + size:#x}", args.bin],
        check=True, capture_output=True, text=True,
    ).stdout
    for m in re.finditer(r"^\s+([0-9a-f]+):\s+(\S+)", out, re.M):
        mnemonic[int(m.group(1), 16) + BASE] = m.group(2)

dfilter = ",".join(f"{s + BASE:#x}+{n:#x}" for s, n in ranges)
trace = re.compile(rb"^Trace \d+: \S+ \[[0-9a-f]+/([0-9a-f]+)/")
ENDS = re.compile(r"^(b|b\..*|bl|blr|br|ret|cbn?z|tbn?z|svc|brk|udf)$")


def block(pc):
    """The mnemonics of the translated block starting at pc."""
    out = []
    while pc in mnemonic and len(out) < 512:
        out.append(mnemonic[pc])
        pc += 4
        if ENDS.match(out[-1]) or pc % 4096 == 0:
            break
    return out


def run(cmd, env, one_per_block):
    log = ["-singlestep", "-d", "exec"] if one_per_block else ["-d", "exec,nochain"]
    full = ["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"] + log + [
        "-dfilter", dfilter, "-D", "/dev/stderr"] + cmd
    p = subprocess.Popen(full, env=dict(os.environ, QEMU_CPU="max", **env),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pcs = collections.Counter()
    for line in p.stderr:
        m = trace.match(line)
        if m:
            pcs[int(m.group(1), 16)] += 1
    if p.wait() != 0:
        sys.exit(f"{' '.join(full)}: exit {p.returncode}")
    by = collections.Counter()
    for pc, n in pcs.items():
        for mn in ([mnemonic.get(pc, "?")] if one_per_block else block(pc)):
            by[mn] += n
    return by


if args.check:
    cmd = [args.bin, "engine::ggml::tests::a_split_product_equals_the_whole", "--test-threads", "1"]
    for isa in isas:
        a = run(cmd, {"FIELDLLM_ISA": isa}, True)
        b = run(cmd, {"FIELDLLM_ISA": isa}, False)
        print(f"{isa:14} singlestep {sum(a.values()):8} blocks expanded {sum(b.values()):8} "
              f"smmla {a['smmla']}/{b['smmla']} sdot {a['sdot']}/{b['sdot']}")
    sys.exit(0)


def count(isa, prompt):
    cmd = [args.bin, "bench", "--model", args.model, "--threads", "1", "--prompt", str(prompt),
           "--gen", "1", "--reps", "1", "--json"]
    return run(cmd, {"FIELDLLM_ISA": isa}, False)


def per_token(a, b, scale_a, scale_b):
    keys = set(a) | set(b)
    return {k: scale_a * a.get(k, 0) + scale_b * b.get(k, 0) for k in keys}


print(f"binary {args.bin}, model {args.model}")
print("per token, matrix kernels only, millions of instructions:")
print(f"{'isa':14} {'phase':8} {'all':>8} {'sdot':>7} {'smmla':>7} {'smull*':>7} {'loads':>7}")
for isa in isas:
    one = count(isa, 1)
    four = count(isa, 4)
    decode = per_token(one, {}, 1 / 3, 0)
    prefill = per_token(four, one, 1 / 4, -2 / 3 / 4)
    for phase, c in (("prefill", prefill), ("decode", decode)):
        total = sum(c.values())
        smull = c.get("smull", 0) + c.get("smull2", 0)
        loads = sum(v for k, v in c.items() if k.startswith("ld"))
        print(f"{isa:14} {phase:8} {total / 1e6:8.2f} {c.get('sdot', 0) / 1e6:7.2f} "
              f"{c.get('smmla', 0) / 1e6:7.2f} {smull / 1e6:7.2f} {loads / 1e6:7.2f}")
