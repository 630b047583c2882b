#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer test vocabularies (MIT) from the llama-cpp-python 0.3.36 sdist
# on PyPI (sha256-pinned): vocab-only GGUFs of GPT-2, Llama 3 (llama-bpe), Llama 2
# (llama-spm) and Qwen2, each with its test inputs (.inp) and the token ids llama.cpp and HF give them
# (.out). The Rust GGUF import's tokenizer is checked against them. Idempotent. Prints the
# folder's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache="$here/cache"
version=0.3.36
sdist=llama_cpp_python-$version.tar.gz
sdist_sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
out="$cache/llama-vocabs"
names=(gpt-2 llama-bpe llama-spm qwen2)

# shellcheck source=wheel.sh
. "$here/wheel.sh"

# the stamp names what was unpacked: a list grown since is unpacked again
if [ -f "$out/.unpacked" ] && [ "$(cat "$out/.unpacked")" = "${names[*]}" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
if ! { [ -f "$cache/$sdist" ] && check "$cache/$sdist" "$sdist_sha"; }; then
  rm -f "$cache/$sdist"
  "${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: --dest "$cache" "llama-cpp-python==$version" >&2
  check "$cache/$sdist" "$sdist_sha" || { echo "$(basename "$0"): $sdist: sha256 mismatch" >&2; exit 1; }
fi
rm -rf "$out" "$out.part"
mkdir -p "$out.part"
members=()
for n in "${names[@]}"; do
  for ext in "" .inp .out; do
    members+=("llama_cpp_python-$version/vendor/llama.cpp/models/ggml-vocab-$n.gguf$ext")
  done
done
tar -xzf "$cache/$sdist" -C "$out.part" --strip-components=4 "${members[@]}"
tar -xzf "$cache/$sdist" -O "llama_cpp_python-$version/vendor/llama.cpp/LICENSE" >"$out.part/LICENSE"
# the big sdist is not needed once the vocabularies are out
rm -f "$cache/$sdist"
echo "${names[*]}" > "$out.part/.unpacked"
mv "$out.part" "$out"
echo "$out"
