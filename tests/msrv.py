#!/usr/bin/env python3
"""The workspace's rust-version is the lowest Rust that builds it: no lower than any dependency
in Cargo.lock declares (cargo refuses to build those with an older rustc), and no higher.

Only this machine's one toolchain can run here (rustup fetches no other), so `cargo +1.91
check` cannot; what a compiler of that version would refuse in our own code is covered by
clippy's `incompatible_msrv` lint (std APIs newer than rust-version), which the lint build
runs with -D warnings. Run from the repository root.
"""
import json
import subprocess
import sys


def version(v):
    return tuple(int(x) for x in v.split(".")) + (0,) * (3 - len(v.split(".")))


meta = json.loads(
    subprocess.check_output(["cargo", "metadata", "--format-version", "1", "--locked"])
)
ours = set(meta["workspace_members"])
resolved = {n["id"] for n in meta["resolve"]["nodes"]}
declared = version(
    next(p for p in meta["packages"] if p["id"] in ours)["rust_version"] or "0"
)
needs = max(
    (
        (version(p["rust_version"]), f'{p["name"]} {p["version"]}')
        for p in meta["packages"]
        if p["id"] in resolved and p["id"] not in ours and p.get("rust_version")
    ),
)
show = lambda v: ".".join(map(str, v[:2] if v[2] == 0 else v))
if declared < needs[0]:
    sys.exit(f"rust-version {show(declared)} is below {needs[1]}'s {show(needs[0])}")
if declared > needs[0]:
    sys.exit(
        f"rust-version {show(declared)} is above what the dependencies need ({needs[1]}: "
        f"{show(needs[0])}): lower it unless our own code needs more, and say why in Cargo.toml"
    )
print(f"rust-version {show(declared)}: set by {needs[1]}, the dependency that needs the most")
