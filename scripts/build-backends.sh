#!/usr/bin/env bash
# Builds ggml backends as shared libraries from the pinned ollama module's own
# sources (its CMakeLists.txt, the ggml that cgo compiles into our binary),
# for the engine to load at start (docs/gpu.md):
#
#   scripts/build-backends.sh cuda               ggml-cuda into build/lib/ollama (nvcc, CMake); make cuda
#   scripts/build-backends.sh cpu [VARIANT...]   CPU variants (default: x64 haswell); make cpu-backends
#                                                puts them in build/test/lib/ollama for the loader's tests
#
# The Go binary is the same with or without them: ollama's loader
# (ggml_backend_load_all_from_path) looks in $OLLAMA_LIBRARY_PATH, or in
# ../lib/ollama next to the executable, and registers what it finds.
# CUDA_ARCHITECTURES (e.g. 90 for an H100/H200) limits the GPUs compiled for;
# the default is CMake's "native" (the GPUs of the machine that builds).
# KVRECALL_BACKENDS_OUT overrides the output folder (its path must contain
# lib/ollama: ollama's loader skips other folders). OLLAMA_SRC names the
# ollama sources where Go is not installed (scripts/gpu-check.sh's kit).
#
# Only CMake's own cache variables (CMAKE_*) can be set from here: ollama's
# CMakeLists.txt set()s its GGML_* options as normal variables, which hide
# any -DGGML_...=... given on the command line.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}

what=${1:-}
[ $# -gt 0 ] && shift

usage() {
  echo "usage: scripts/build-backends.sh cuda | cpu [VARIANT...]   (CPU variants: x64 sse42 sandybridge haswell skylakex icelake alderlake)" >&2
  exit 2
}

# Backends we do not build are switched off, so that a toolkit or SDK that
# happens to be installed cannot break the configure step (CUDA's "native"
# architectures need a GPU; Vulkan headers without glslc are fatal).
no_hip=(-DCMAKE_HIP_COMPILER=)
no_vulkan=(-DCMAKE_DISABLE_FIND_PACKAGE_Vulkan=ON)
cmake_args=()
case "$what" in
cuda)
  nvcc=${CUDACXX:-}
  if [ -n "$nvcc" ] && [ ! -x "$nvcc" ]; then
    echo "make cuda: CUDACXX=$nvcc is not an executable nvcc" >&2
    exit 3
  fi
  [ -n "$nvcc" ] || nvcc=$(command -v nvcc || true)
  if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
  if [ -z "$nvcc" ]; then
    echo "make cuda: nvcc not found (not on PATH, no \$CUDACXX, no /usr/local/cuda/bin/nvcc)." >&2
    echo "  ggml's CUDA backend needs the CUDA toolkit (nvcc, cuBLAS) to build; CPU builds need none of it." >&2
    echo "  Install the toolkit, or point CUDACXX at nvcc, then run make cuda again." >&2
    exit 3
  fi
  targets=(ggml-cuda)
  libs=(libggml-cuda.so)
  kind=cuda
  out=${KVRECALL_BACKENDS_OUT:-$PWD/build/lib/ollama}
  cmake_args+=(-DCMAKE_CUDA_COMPILER="$nvcc" "${no_hip[@]}" "${no_vulkan[@]}")
  if [ -n "${CUDA_ARCHITECTURES:-}" ]; then
    cmake_args+=(-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES")
  fi
  ;;
cpu)
  case "$(uname -m)" in
  x86_64 | amd64) ;;
  *) echo "build-backends: the CPU variants here are x86-64 ones; this machine is $(uname -m)" >&2; exit 2 ;;
  esac
  variants=("$@")
  [ ${#variants[@]} -gt 0 ] || variants=(x64 haswell)
  targets=()
  libs=()
  for v in "${variants[@]}"; do
    case "$v" in
    x64 | sse42 | sandybridge | haswell | skylakex | icelake | alderlake)
      targets+=("ggml-cpu-$v")
      libs+=("libggml-cpu-$v.so")
      ;;
    *) echo "build-backends: unknown CPU variant $v" >&2; usage ;;
    esac
  done
  kind=cpu
  out=${KVRECALL_BACKENDS_OUT:-$PWD/build/test/lib/ollama}
  cmake_args+=(-DCMAKE_CUDA_COMPILER= "${no_hip[@]}" "${no_vulkan[@]}")
  ;;
*) usage ;;
esac
case "$out" in
*lib/ollama*) ;;
*) echo "build-backends: output folder $out must contain lib/ollama (ollama's loader skips other folders)" >&2; exit 2 ;;
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

# One build folder per source folder: CMake refuses a cache made from other
# sources, as after an ollama upgrade (ollama@v0.17.4 -> ...).
mkdir -p build
build=build/cmake-$kind-$(basename "$src" | tr -c 'A-Za-z0-9.@_\n-' '_')
jobs=$(nproc 2>/dev/null || echo 2)
generator=()
command -v ninja >/dev/null && [ ! -f "$build/CMakeCache.txt" ] && generator=(-G Ninja)
echo "build-backends: configuring $kind from $src in $build" >&2
# The module cache is read-only: CMake builds out of the source tree.
# $ORIGIN: a backend finds libggml-base next to itself wherever the folder goes.
cmake -S "$src" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release '-DCMAKE_BUILD_RPATH=$ORIGIN' \
  "${cmake_args[@]}" >"$build.configure.log" 2>&1 ||
  { tail -30 "$build.configure.log" >&2; echo "build-backends: cmake configure failed (log: $build.configure.log)" >&2; exit 1; }
echo "build-backends: building ${targets[*]} with $jobs jobs" >&2
cmake --build "$build" --target "${targets[@]}" -j "$jobs" ||
  { echo "build-backends: build of ${targets[*]} failed" >&2; exit 1; }

mkdir -p "$out"
# The libraries asked for and the libggml-base they link against (a copy of
# the ggml that our binary also has compiled in). Only those: a variant
# left from an earlier build would be loaded in their place.
for lib in "${libs[@]}"; do
  cp "$build/lib/ollama/$lib" "$out/"
done
cp -a "$build"/lib/ollama/libggml-base.so* "$out/"
# Newer than the script and the build inputs, for make.
touch "${libs[@]/#/$out/}"
echo "build-backends: ${libs[*]} and libggml-base in $out" >&2
echo "build-backends: run with OLLAMA_LIBRARY_PATH=$out (kvrecall devices lists what loads)" >&2
