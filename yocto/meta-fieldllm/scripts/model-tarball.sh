#!/usr/bin/env bash
# Packs a model artifact for the fieldllm-model-* recipes, reproducibly (sorted, no owners,
# fixed times), into the recipe's files/ folder.
#   scripts/model-tarball.sh [ARTIFACT_DIR]   (default: models/build/smollm2-135m-instruct.gguf)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=${1:-$here/../../models/build/smollm2-135m-instruct.gguf}
[ -f "$src/manifest.toml" ] || { echo "no model artifact at $src (run models/setup.sh)" >&2; exit 1; }
out=$here/recipes-ai/fieldllm/files/$(basename "$src").tar.gz
mkdir -p "$(dirname "$out")"
tar -C "$(dirname "$src")" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
  -cf - "$(basename "$src")" | gzip -n >"$out"
sha256sum "$out"
