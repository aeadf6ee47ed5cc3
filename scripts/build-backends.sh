#!/usr/bin/env bash
# Builds ggml backends as shared libraries from the pinned ollama module's own
# sources (its CMakeLists.txt, the ggml that cgo compiles into our binary) into
# build/lib/ollama, where the engine loads them at start (docs/gpu.md):
#
#   scripts/build-backends.sh cuda               ggml-cuda (needs nvcc and CMake); make cuda
#   scripts/build-backends.sh cpu [VARIANT...]   CPU variants (default: x64 haswell); make cpu-backends
#
# The Go binary is the same with or without them: ollama's loader
# (ggml_backend_load_all_from_path) looks in $OLLAMA_LIBRARY_PATH, or in
# ../lib/ollama next to the executable, and registers what it finds.
# CUDA_ARCHITECTURES (e.g. 90 for an H100/H200) limits the GPUs compiled for;
# the default is CMake's "native" (the GPUs of the machine that builds).
# KVRECALL_BACKENDS_OUT overrides the output folder (its path must contain
# lib/ollama: ollama's loader skips other folders). OLLAMA_SRC names the
# ollama sources where Go is not installed (scripts/gpu-check.sh's kit).
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}

what=${1:-}
[ $# -gt 0 ] && shift
out=${KVRECALL_BACKENDS_OUT:-$PWD/build/lib/ollama}
case "$out" in
*lib/ollama*) ;;
*) echo "build-backends: output folder $out must contain lib/ollama (ollama's loader skips other folders)" >&2; exit 2 ;;
esac

usage() {
  echo "usage: scripts/build-backends.sh cuda | cpu [VARIANT...]   (CPU variants: x64 sse42 sandybridge haswell skylakex icelake alderlake)" >&2
  exit 2
}

cmake_args=()
case "$what" in
cuda)
  nvcc=${CUDACXX:-}
  [ -n "$nvcc" ] || nvcc=$(command -v nvcc || true)
  [ -n "$nvcc" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc; } || true
  if [ -z "$nvcc" ]; then
    echo "make cuda: nvcc not found (not on PATH, no \$CUDACXX, no /usr/local/cuda/bin/nvcc)." >&2
    echo "  ggml's CUDA backend needs the CUDA toolkit (nvcc, cuBLAS) to build; CPU builds need none of it." >&2
    echo "  Install the toolkit, or point CUDACXX at nvcc, then run make cuda again." >&2
    exit 3
  fi
  targets=(ggml-cuda)
  build=build/cmake-cuda
  cmake_args+=(-DCMAKE_CUDA_COMPILER="$nvcc")
  if [ -n "${CUDA_ARCHITECTURES:-}" ]; then
    cmake_args+=(-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES")
  fi
  ;;
cpu)
  variants=("$@")
  [ ${#variants[@]} -gt 0 ] || variants=(x64 haswell)
  targets=()
  for v in "${variants[@]}"; do
    case "$v" in
    x64 | sse42 | sandybridge | haswell | skylakex | icelake | alderlake) targets+=("ggml-cpu-$v") ;;
    *) echo "build-backends: unknown CPU variant $v" >&2; usage ;;
    esac
  done
  build=build/cmake-cpu
  ;;
*) usage ;;
esac

if ! command -v cmake >/dev/null; then
  echo "build-backends: cmake is missing (sudo apt-get install cmake; ollama's CMakeLists.txt needs 3.21 or later)" >&2
  exit 2
fi

src=${OLLAMA_SRC:-}
if [ -z "$src" ]; then
  command -v "$GO" >/dev/null || { echo "build-backends: neither Go nor OLLAMA_SRC: set OLLAMA_SRC to the ollama module's sources" >&2; exit 2; }
  src=$($GO list -m -f '{{.Dir}}' github.com/ollama/ollama)
fi
[ -f "$src/CMakeLists.txt" ] || { echo "build-backends: no CMakeLists.txt in $src (go mod download first)" >&2; exit 2; }

jobs=$(nproc 2>/dev/null || echo 2)
echo "build-backends: configuring $what from $src in $build" >&2
# The module cache is read-only: CMake builds out of the source tree.
# $ORIGIN: a backend finds libggml-base next to itself wherever the folder goes.
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release '-DCMAKE_BUILD_RPATH=$ORIGIN' \
  -DGGML_CCACHE=OFF "${cmake_args[@]}" >"$build.configure.log" 2>&1 ||
  { tail -30 "$build.configure.log" >&2; echo "build-backends: cmake configure failed (log: $build.configure.log)" >&2; exit 1; }
if [ "$what" = cuda ] && ! grep -q "ggml-cuda\|CUDA Toolkit found\|Found CUDAToolkit" "$build.configure.log"; then
  tail -30 "$build.configure.log" >&2
  echo "build-backends: CMake did not enable CUDA with $nvcc (log: $build.configure.log)" >&2
  exit 1
fi
echo "build-backends: building ${targets[*]} with $jobs jobs" >&2
cmake --build "$build" --target "${targets[@]}" -j "$jobs" ||
  { echo "build-backends: build of ${targets[*]} failed" >&2; exit 1; }

mkdir -p "$out"
# The libraries and their libggml-base (a copy of the ggml that our binary
# also has compiled in, which every loaded backend links against).
cp -a "$build"/lib/ollama/*.so* "$out"/
echo "build-backends: $(cd "$out" && ls *.so | tr '\n' ' ')in $out" >&2
echo "build-backends: run with OLLAMA_LIBRARY_PATH=$out (kvrecall devices lists what loads)" >&2
