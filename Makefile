# kvrecall build. ggml's CPU code is compiled by cgo, so the flags below decide
# whether it uses SIMD (a plain `go build` gets none and runs 4-10x slower).
# Portable binaries: make SIMD_FLAGS="-O3 -march=haswell"
# -mno-amx-*: on a CPU with AMX (Intel Sapphire Rapids and later),
# -march=native defines __AMX_INT8__ and ggml-cpu.cpp then calls
# ggml_backend_amx_buffer_type(), whose source (ggml-cpu/amx/) is in a
# subfolder cgo does not compile: the link fails. Matrix multiplies in
# f16/f32 do not use AMX in ggml anyway (only quantized int8 ones).
SHELL := /bin/bash
GO ?= go
SIMD_FLAGS ?= -O3 -march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
TEST_TIMEOUT ?= 80m
TEST_FLAGS ?=
# Framework adapters, each its own Go module (their dependencies stay out of
# the core's go.mod); `go test ./...` at the root does not enter them.
ADAPTERS := adapters/langchaingo adapters/eino

# Written by scripts/setup-build.sh: include paths for cgo (miniaudio, llama.h).
-include build/cgo.env

export CGO_ENABLED := 1
export CGO_CFLAGS := $(SIMD_FLAGS)
export CGO_CXXFLAGS := $(SIMD_FLAGS)
export CGO_CPPFLAGS

.PHONY: all setup build install demo serve test test-adapters test-short bench fuzz models clean cuda cpu-backends

all: build

build/cgo.env: scripts/setup-build.sh go.mod go.sum
	./scripts/setup-build.sh

setup: build/cgo.env

build: build/cgo.env
	$(GO) build ./...

# The kvrecall command, with SIMD, into $(go env GOBIN) or ~/go/bin.
install: build/cgo.env
	$(GO) install ./cmd/kvrecall

# The main job on the embedded default: builds the recall model if absent and
# answers a needle-in-a-haystack question over ~16k tokens.
demo: build/cgo.env
	$(GO) run ./cmd/kvrecall demo

# The local endpoint (see docs/server.md); pass flags with ARGS="--model my.gguf".
serve: build/cgo.env
	$(GO) run ./cmd/kvrecall serve $(ARGS)

# ggml backends as shared libraries, loaded at start from build/lib/ollama
# (OLLAMA_LIBRARY_PATH; docs/gpu.md). The binary is the same without them.
# cuda needs nvcc and CMake and says so where they are missing;
# CUDA_ARCHITECTURES=90 limits it to one GPU generation (faster to build).
cuda: build/cgo.env
	./scripts/build-backends.sh cuda

# Two CPU variants (x64, haswell), in a folder of their own: the loader's
# tests (device, runtime's TestLoadedCPUBackend) load them the way ggml-cuda
# is loaded. Not for running models: on the loader's path they would take
# over host work from the compiled-in -march=native backend.
CPU_BACKENDS := build/test/lib/ollama/libggml-cpu-x64.so build/test/lib/ollama/libggml-cpu-haswell.so
cpu-backends: $(CPU_BACKENDS)
$(CPU_BACKENDS) &: build/cgo.env scripts/build-backends.sh
	./scripts/build-backends.sh cpu x64 haswell

test: build/cgo.env $(CPU_BACKENDS)
	@./scripts/require-redis.sh
	$(GO) vet ./...
	$(GO) test -timeout $(TEST_TIMEOUT) $(TEST_FLAGS) ./...
	# Concurrent questions on one shared document, closing a model under a
	# running generation, timeouts and shutdown, a delete racing a load and
	# the document memory bound, probe statistics per session, and concurrent
	# Generate and Ask through the kvrecall API, under the race detector.
	$(GO) test -race -timeout 30m -run 'TestConcurrentAsk|TestParallelClients|TestQueueFull|TestDisconnectCancels|TestCloseDuringGeneration|TestTimeouts|TestShutdownCancelsStreamsVisibly|TestDeleteRacesOpen|TestDocumentMemoryBound|TestEvictionDuringAsk|TestSessionsDoNotShareStatistics|TestConcurrentGenerateAndAsk|TestDenseStepGraphConcurrent|TestPagedStepGraphConcurrent' . ./runtime ./server ./probe
	$(MAKE) test-adapters

# The adapters' modules, with the same cgo flags (exported above). One test
# binary at a time (-p 1): two binaries whose ggml threads spin-wait on the
# same cores ran 20x slower (38 s instead of 2 s on 2 cores).
test-adapters: build/cgo.env
	set -e; for d in $(ADAPTERS); do (cd $$d && $(GO) vet ./... && $(GO) test -p 1 -timeout 20m $(TEST_FLAGS) ./...); done

test-short: build/cgo.env $(CPU_BACKENDS)
	$(GO) test -short -timeout 20m ./...
	set -e; for d in $(ADAPTERS); do (cd $$d && $(GO) test -short -timeout 20m ./...); done

# Benchmarks are not tests: they report ratios against dense baselines.
bench: build/cgo.env
	$(GO) run ./cmd/kvrecall bench speed

# One fuzzer per go test (go test -fuzz takes one target), one after the other.
fuzz: build/cgo.env
	$(GO) test ./gguf -run '^$$' -fuzz FuzzRead -fuzztime 60s
	$(GO) test ./kvcache -run '^$$' -fuzz FuzzPageFile -fuzztime 60s

clean:
	rm -rf build
