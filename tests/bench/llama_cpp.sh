# Sourced by the side-by-side scripts (from the repository root, with $cache and
# $llama_version set): builds llama.cpp from the llama-cpp-python sdist on PyPI (it vendors
# llama.cpp) into $cache, and sets $bench_bin, $ppl_bin, $quant_bin and $server_bin.

# GGML_NATIVE: llama.cpp as its users build it on this machine (fieldllmd itself never uses
# -march=native; it ships to aarch64). But not AMX: this project's Intel VMs report AMX in cpuid
# and fault on it ("Illegal instruction" in llama-bench, seen here). GGML_AMX_* off is not
# enough, because -march=native turns the instructions on for the compiler itself; explicit
# -mno-amx-* flags win over what -march implies, wherever they stand on the command line (GCC
# keeps explicitly set ISA flags). x86-64 only: an ARM compiler does not know them.
flags=
case "$(uname -m)" in
  x86_64) flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
esac
build="$cache/llama.cpp-$llama_version/build"
bench_bin="$build/bin/llama-bench"
ppl_bin="$build/bin/llama-perplexity"
quant_bin="$build/bin/llama-quantize"
server_bin="$build/bin/llama-server"
# a build made with other flags (an older script's, with AMX) is made again
if [ ! -x "$bench_bin" ] || [ ! -x "$ppl_bin" ] || [ ! -x "$quant_bin" ] || [ ! -x "$server_bin" ] || [ "$(cat "$build/.fieldllm-flags" 2>/dev/null)" != "native $flags" ]; then
  mkdir -p "$cache"
  models/.venv/bin/pip download --quiet --no-deps --no-binary :all: -d "$cache" "llama-cpp-python==$llama_version"
  rm -rf "$cache/src" && mkdir -p "$cache/src"
  tar -xzf "$cache/llama_cpp_python-$llama_version.tar.gz" -C "$cache/src"
  rm -rf "$cache/llama.cpp-$llama_version"
  mv "$cache/src/llama_cpp_python-$llama_version/vendor/llama.cpp" "$cache/llama.cpp-$llama_version"
  cmake -S "$cache/llama.cpp-$llama_version" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
    -DGGML_AMX_BF16=OFF -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$build" --target llama-bench llama-perplexity llama-quantize llama-server \
    -j "$(nproc)" >/dev/null
  echo "native $flags" > "$build/.fieldllm-flags"
fi

