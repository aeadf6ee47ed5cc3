#!/usr/bin/env bash
# Prepares what the cgo build of ollama's llama.cpp package needs and the Go
# module zip lacks: Debian's nlohmann-json and stb headers, and miniaudio.h
# taken from the github.com/gen2brain/malgo module. Idempotent; run by make.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}

missing=()
[ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
[ -f /usr/include/stb/stb_image.h ] || missing+=(libstb-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]} (headers llama.cpp needs)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
  else
    echo "setup: missing C headers. Install them, then run make again:" >&2
    echo "  sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# redis-server: `make test` runs the shared-store tests (docs/store.md)
# against a real one, started on a loopback port per test. Not needed to
# build, so its absence is only an error when the tests run.
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing redis-server (the shared-store tests start one)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q redis-server >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; } \
      || echo "setup: could not install redis-server; make test needs it (sudo apt-get install redis-server)" >&2
  else
    echo "setup: make test needs redis-server: sudo apt-get install redis-server" >&2
  fi
fi

# cmake: `make test` builds two ggml CPU variants as shared libraries
# (scripts/build-backends.sh) to test the backend loader a GPU library goes
# through; `make cuda` needs it too. Not needed to build kvrecall itself.
if ! command -v cmake >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing cmake (make test builds ggml's CPU variants to test the backend loader)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q cmake >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q cmake >/dev/null; } \
      || echo "setup: could not install cmake; make test needs it (sudo apt-get install cmake)" >&2
  else
    echo "setup: make test needs cmake: sudo apt-get install cmake" >&2
  fi
fi

$GO mod download
malgo=$($GO list -m -f '{{.Dir}}' github.com/gen2brain/malgo)
mkdir -p build/include/miniaudio
if [ ! -f build/include/miniaudio/miniaudio.h ]; then
  cp "$malgo/miniaudio.h" build/include/miniaudio/miniaudio.h
  chmod u+w build/include/miniaudio/miniaudio.h
fi
ollama=$($GO list -m -f '{{.Dir}}' github.com/ollama/ollama)
# Flags for every cgo build, read by the Makefile.
cat > build/cgo.env <<ENV
OLLAMA_DIR=$ollama
CGO_CPPFLAGS=-I$PWD/build/include -I$ollama/llama/llama.cpp/include -I$ollama/ml/backend/ggml/ggml/include
ENV
# The same for a shell: source build/env.sh
cat > build/env.sh <<ENV
export CGO_ENABLED=1
export CGO_CFLAGS="\${SIMD_FLAGS:--O3 -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16}"
export CGO_CXXFLAGS="\${SIMD_FLAGS:--O3 -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16}"
export CGO_CPPFLAGS="-I$PWD/build/include -I$ollama/llama/llama.cpp/include -I$ollama/ml/backend/ggml/ggml/include"
ENV
