#!/usr/bin/env bash
# Rebuild the llama.cpp peer the benchmarks compare against, and convert checkpoints for it.
#
#   benchmarks/peers/build_llama_cpp.sh WORKDIR [HF_FOLDER ...]
#
# Builds llama-server, llama-bench and llama-quantize (native, AMX int8/bf16) from the llama.cpp
# that llama-cpp-python's source distribution vendors (0.3.36 unless LLAMA_CPP_PYTHON_VERSION says
# otherwise) into WORKDIR/build/bin, then writes each HF_FOLDER (a GPT-2 folder, as
# `cpm-checkpoint random` or `convert` writes) as WORKDIR/<name>-f32.gguf and -q8_0.gguf (and
# -q4_0 with Q4=1) with hf_to_gguf.py beside this script. Needs pip (network), cmake, a C++
# compiler, and numpy, safetensors and sentencepiece (`pip install gguf` is done here).
set -euo pipefail
HERE=$(dirname "$(realpath "$0")")  # before the cd below: $0 may be relative
WORK=$(realpath -m "$1"); shift
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$WORK"
cd "$WORK"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
  tar xzf "sdist/llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

# GCC 12 may move the tile configuration's stores past _tile_loadconfig (AMX then faults or
# computes garbage); a compiler barrier right before the call keeps them in order.
MMQ="$SRC/ggml/src/ggml-cpu/amx/mmq.cpp"
if ! grep -q 'cpm-deploy: barrier' "$MMQ"; then
  sed -i 's|^\(\s*\)_tile_loadconfig(&tc);|\1asm volatile("" ::: "memory");  // cpm-deploy: barrier\n\1_tile_loadconfig(\&tc);|' "$MMQ"
  grep -q 'cpm-deploy: barrier' "$MMQ" || { echo "could not patch $MMQ" >&2; exit 1; }
fi

log() { "$@" >>"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }; }
log cmake -S "$SRC" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_AMX_TILE=ON -DGGML_AMX_INT8=ON \
  -DGGML_AMX_BF16=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
log cmake --build build -j "$JOBS" --target llama-server llama-bench llama-quantize
echo "built: $(ls build/bin)"

pip install --quiet "$SRC/gguf-py"  # the gguf writer of the same llama.cpp
for hf in "$@"; do
  name=$(basename "$hf")
  [ -f "$name-f32.gguf" ] || python "$HERE/hf_to_gguf.py" "$hf" "$name-f32.gguf"
  [ -f "$name-q8_0.gguf" ] || build/bin/llama-quantize "$name-f32.gguf" "$name-q8_0.gguf" q8_0 >/dev/null 2>&1
  if [ "${Q4:-0}" = 1 ] && [ ! -f "$name-q4_0.gguf" ]; then
    build/bin/llama-quantize "$name-f32.gguf" "$name-q4_0.gguf" q4_0 >/dev/null 2>&1
  fi
  echo "converted: $name"
done
