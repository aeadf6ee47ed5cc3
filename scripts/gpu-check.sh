#!/usr/bin/env bash
# The GPU check of docs/gpu.md:
#
#   scripts/gpu-check.sh prepare          here (Go, the module cache): build/gpu-kit/ with a
#                                         portable kvrecall binary (x86-64-v3, stripped, xz),
#                                         ollama's ggml sources and CMakeLists.txt, stories260k
#   scripts/gpu-check.sh build            on the GPU machine (nvcc, CMake; no Go): ggml-cuda from
#                                         the kit; a second call resumes where a first was cut off
#   scripts/gpu-check.sh run [--dry-run]  builds ggml-cuda if it is not there, then every check
#
# run's checks, in order of what they tell, each under its own time limit:
#   devices   kvrecall devices --json: the GPU ggml loaded, its name and memory
#   parity    bench parity: tiny llama and qwen2 (f32), the recall model and stories260k on the
#             GPU against the CPU: dense and paged (quest) logits, greedy tokens
#   paged32k  bench speed --paged on the GPU, 32k then 128k (paged128k): window/quest/retro
#             against dense and the 2k floor, the ingest timed against llama.cpp's prefill
#   paged32k-graph-uploads  the 32k document again (stored), quest and retro with their page
#             uploads as graph inputs (--graph-uploads) instead of device staging
#   niah      bench niah on the GPU: recall model, 16k, three depths, dense/quest/retro
#   dense     bench speed: dense decode and prefill, ours and llama.cpp's, both on the GPU
#
# Results: $OUT/log.txt as it goes, and $OUT/gpu-check.tgz (every step's output and run
# folder) repacked after each step, so a run cut off still brings back what it did (the
# device tool returns at most 8 files). GPU_CHECK_SECONDS (default 570: the tool gives a
# command 600 s) bounds the whole command; set it lower when less device time is left.
#
# --dry-run runs the same steps on the CPU, smaller: the CUDA build is checked up to where it
# needs nvcc (it must stop there with exit 3 on a machine without one), every bench runs with
# --device cpu. The device tool's calls (docs/gpu.md):
#   run(command="scripts/gpu-check.sh run", carry=["build/gpu-kit"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
kit=$root/build/gpu-kit
work=${TMPDIR:-/tmp}/kvrecall-gpu-check
dest=${OUT:-$root/gpu-check-out}
res=$work/results
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))
failed=()

prepare() {
  set -e
  : "${GO:=go}"
  mkdir -p "$kit"
  [ -f build/env.sh ] || ./scripts/setup-build.sh
  echo "gpu-check: building a portable kvrecall (x86-64-v3: AVX2/FMA/F16C; the GPU machine's CPU is not this one)" >&2
  (
    # shellcheck disable=SC1091
    source build/env.sh
    export CGO_CFLAGS="-O3 -march=x86-64-v3" CGO_CXXFLAGS="-O3 -march=x86-64-v3"
    "$GO" build -ldflags "-s -w" -o "$kit/kvrecall" ./cmd/kvrecall
  )
  rm -f "$kit/kvrecall.xz"
  xz -T0 -6 "$kit/kvrecall"
  src=$("$GO" list -m -f '{{.Dir}}' github.com/ollama/ollama)
  echo "gpu-check: packing ggml's sources from $src" >&2
  tar -C "$src" -cJf "$kit/ollama-src.tar.xz" CMakeLists.txt ml/backend/ggml/ggml
  stories=$root/../shared/models/stories260k-f32.gguf
  if [ -f "$stories" ]; then
    cp "$stories" "$kit/stories260k-f32.gguf"
  else
    echo "gpu-check: $stories is missing: the parity check will run without stories260k" >&2
  fi
  du -sh "$kit"/* >&2
  echo "gpu-check: kit ready in $kit ($(du -sh "$kit" | cut -f1)); carry build/gpu-kit to the GPU machine" >&2
}

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$dest/log.txt" >&2; }
pack() { tar -C "$res" -czf "$dest/gpu-check.tgz.tmp" . 2>/dev/null && mv "$dest/gpu-check.tgz.tmp" "$dest/gpu-check.tgz"; }

# step NAME LIMIT_S CMD...: runs CMD under what is left of the deadline,
# stdout and stderr into $res/NAME.txt; a failed step does not stop the run.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS - 10))
  if [ $left -lt 15 ]; then
    log "$name: skipped, the run's ${GPU_CHECK_SECONDS:-570} s are spent"
    failed+=("$name(no time)")
    return 1
  fi
  [ "$limit" -le $left ] || limit=$left
  log "$name (limit $limit s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$res/$name.txt" 2>&1
  local rc=$?
  log "$name: rc=$rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed+=("$name(rc=$rc)")
  tail -15 "$res/$name.txt" >&2
  pack
  return $rc
}

# unpack: the binary and the ggml sources from the kit into $work.
unpack() {
  [ -f "$kit/kvrecall.xz" ] || { echo "gpu-check: no kit in $kit: run scripts/gpu-check.sh prepare here first" >&2; exit 2; }
  mkdir -p "$work" "$res" "$dest"
  if [ ! -x "$work/kvrecall" ] || [ "$kit/kvrecall.xz" -nt "$work/kvrecall" ]; then
    xz -dc "$kit/kvrecall.xz" >"$work/kvrecall" && chmod +x "$work/kvrecall"
  fi
  if [ ! -f "$work/ollama/CMakeLists.txt" ]; then
    mkdir -p "$work/ollama" && tar -C "$work/ollama" -xJf "$kit/ollama-src.tar.xz"
  fi
  kv=$work/kvrecall
}

build_cuda() {
  # One architecture (H100/H200: 90) keeps the build to minutes.
  export CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-90}
  step cuda-build 560 env OLLAMA_SRC="$work/ollama" scripts/build-backends.sh cuda
}

run() {
  local dry=$1
  unpack
  export KVRECALL_MODELS=$work/models OLLAMA_LIBRARY_PATH=$root/build/lib/ollama
  mkdir -p "$KVRECALL_MODELS"
  log "machine: $(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  if ! ldd "$kv" >"$res/ldd.txt" 2>&1 || grep -q "not found" "$res/ldd.txt"; then
    log "the kvrecall binary does not load here (glibc or libstdc++ older than the build machine's):"
    cat "$res/ldd.txt" >&2
    pack
    exit 1
  fi
  local device
  if [ "$dry" = 1 ]; then
    device=cpu
    export OLLAMA_LIBRARY_PATH=""
    if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
      log "cuda build: nvcc is on this machine, so the check that make cuda stops without it is skipped"
    else
      (unset CUDACXX; OLLAMA_SRC=$work/ollama scripts/build-backends.sh cuda) >"$res/cuda-build.txt" 2>&1
      local rc=$?
      log "cuda build without nvcc: rc=$rc ($(head -1 "$res/cuda-build.txt"))"
      if [ $rc -ne 3 ] || ! grep -q "nvcc not found" "$res/cuda-build.txt"; then
        failed+=("cuda-build(rc=$rc, want 3)")
      fi
    fi
    niah=(--lengths 4096 --depths 50 --method dense,quest,retro)
    dense=(--preset tiny --contexts 2048 --threads 2 --decode 8)
    paged=(--paged --preset tiny --threads 2 --budget 2048 --decode 8 --methods window,quest,retro --floor 2048)
    long=(8192 16384)
  else
    device=gpu
    nvidia-smi -L >"$res/gpu.txt" 2>&1 || true
    log "GPU: $(head -1 "$res/gpu.txt")"
    if [ ! -f "$root/build/lib/ollama/libggml-cuda.so" ]; then
      build_cuda || { log "no ggml-cuda: stopping"; exit 1; }
    fi
    niah=(--lengths 16384 --depths 10,50,90 --method dense,quest,retro)
    dense=(--preset tiny --contexts 2048,8192 --threads "$(nproc)" --decode 32)
    paged=(--paged --preset tiny --threads "$(nproc)" --budget 2048 --decode 32 --methods window,quest,retro --floor 2048)
    long=(32768 131072)
  fi
  # stdout only: the JSON list (the loader's log lines go to stderr).
  log "devices: $kv devices --json"
  "$kv" devices --json >"$res/devices.json" 2>"$res/devices.txt"
  cat "$res/devices.json" >&2
  if [ "$dry" = 0 ] && ! grep -q '"kind": "gpu"' "$res/devices.json"; then
    log "ggml loaded no GPU from $OLLAMA_LIBRARY_PATH: stopping"
    cat "$res/devices.txt" >&2
    pack
    exit 1
  fi
  local M=$work/models
  step models 60 bash -c "'$kv' mkmodel random --arch llama --preset tiny --dtype f32 -o '$M/llama-tiny-f32.gguf' &&
    '$kv' mkmodel random --arch qwen2 --preset tiny --dtype f32 -o '$M/qwen2-tiny-f32.gguf' &&
    '$kv' mkmodel recall -o '$M/recall.gguf'"
  local models=$M/llama-tiny-f32.gguf,$M/qwen2-tiny-f32.gguf,$M/recall.gguf
  [ -f "$kit/stories260k-f32.gguf" ] && models=$models,$kit/stories260k-f32.gguf
  step parity 90 "$kv" bench parity --device "$device" --models "$models" --json "$res/parity.json"
  step paged-${long[0]} 120 "$kv" bench speed --device "$device" "${paged[@]}" --contexts "${long[0]}" --data-dir "$work/docs" --json "$res/paged-${long[0]}.json" --out "$res/paged-${long[0]}-run"
  # The same document, decoded with device staging off: what the staging tensors and
  # asynchronous copies (kvcache.DeviceUploads) change against graph inputs.
  step paged-${long[0]}-graph-uploads 90 "$kv" bench speed --device "$device" "${paged[@]}" --methods quest,retro --skip-llama --graph-uploads --contexts "${long[0]}" --data-dir "$work/docs" --json "$res/paged-${long[0]}-graph-uploads.json" --out "$res/paged-${long[0]}-graph-uploads-run"
  step paged-${long[1]} 150 "$kv" bench speed --device "$device" "${paged[@]}" --contexts "${long[1]}" --json "$res/paged-${long[1]}.json" --out "$res/paged-${long[1]}-run"
  step niah 90 "$kv" bench niah --device "$device" --model "$M/recall.gguf" --budget 2048 "${niah[@]}" --out "$res/niah-run"
  step dense 90 "$kv" bench speed --device "$device" "${dense[@]}" --json "$res/dense.json"
  if [ ${#failed[@]} -gt 0 ]; then
    log "failed: ${failed[*]}"
    pack
    exit 1
  fi
  log "every check passed; results in $dest/gpu-check.tgz"
  pack
}

case "${1:-}" in
prepare) prepare ;;
build)
  unpack
  : >"$dest/log.txt"
  build_cuda
  rc=$?
  pack
  exit $rc
  ;;
run)
  dry=0
  [ "${2:-}" = --dry-run ] && dry=1
  rm -rf "$res" && mkdir -p "$res" "$dest" && : >"$dest/log.txt"
  run $dry
  ;;
*)
  echo "usage: scripts/gpu-check.sh prepare | build | run [--dry-run]" >&2
  exit 2
  ;;
esac
