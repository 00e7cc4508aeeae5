#!/usr/bin/env bash
# The GPU-machine validation run behind the README's tables, in two parts (one device call each):
#   bash scripts/gpu_final.sh tests   every GPU test: kernels, graph, fused GEMV, megakernel, backends
#                                     (tests-shared / tests-solo: either half, one device call each)
#   bash scripts/gpu_final.sh bench   bench latency (megakernel, graph, HF static cache, PyTorch CUDA graph,
#                                     copy bandwidth; 1K/4K/16K contexts; batch 2/4/8), bench throughput
#                                     (batch 1..256 at 1K context, PNG), Llama-3.1-8B batch 1
#   bash scripts/gpu_final.sh latency the same without the throughput sweep
# JSON, PNG and logs go to $OUT (the device tool's output folder; default bench/results).
# The tree travels without .git: pass the commit (with -dirty for uncommitted changes) as MEGATIER_COMMIT,
# e.g. MEGATIER_COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo -dirty). Every log
# starts with the commit, device, date and command; every JSON record carries them too.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 MEGATIER_CACHE_DIR=/tmp/megatier-cache
PY=${PY:-python3}
tag="$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -oE 'H[0-9]+' | head -1 | tr 'H' 'h')_$(date +%F)"
: "${MEGATIER_COMMIT:?set MEGATIER_COMMIT to the commit under test (see the header)}"
export MEGATIER_COMMIT
header() {
  echo "# commit $MEGATIER_COMMIT | $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) |" \
    "$(date -u +%FT%TZ) | bash scripts/gpu_final.sh $*" | tee -a "$OUT/$1"
}
stage() {  # stage SECONDS LOGNAME COMMAND...: time-boxed, so one failure leaves the other results
  local limit=$1 log=$2
  shift 2
  echo "== $*" | tee -a "$OUT/$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$OUT/$log"
}
case "${1:-}" in
  tests | tests-shared | tests-solo)
    # Every test file with GPU tests, each test listed by name with its outcome (-v -rA). The megakernel
    # takes every SM (a cooperative launch), so the files that launch it run alone.
    header gpu_tests.log "$1"
    pytest=("$PY" -m pytest -v -rA -p no:cacheprovider --timeout 120 --timeout-method thread)
    solo=(tests/test_megakernel_gpu.py tests/test_backends.py tests/test_real_model_gpu.py)
    shared=$(grep -l "mark.gpu" tests/test_*.py | grep -v -e megakernel_gpu -e backends -e real_model_gpu)
    [ "$1" = tests-solo ] || stage 300 gpu_tests.log "${pytest[@]}" -n 4 tests/test_kernels.py $shared
    [ "$1" = tests-shared ] || stage 280 gpu_tests.log "${pytest[@]}" "${solo[@]}"
    ;;
  bench | latency)
    header gpu_bench.log "$1"
    mt=("$PY" -m megatier.cli bench)
    dummy=(--load-format dummy --max-model-len 20480)
    stage 240 gpu_bench.log "${mt[@]}" latency --model llama-3.2-1b "${dummy[@]}" --backend megakernel,graph \
      --batch 1 --input-len 32,1024,4096,16384 --baselines torch-compile-graph,torch-eager-graph,hf --json "$OUT/latency_llama-3.2-1b_$tag.json"
    stage 120 gpu_bench.log "${mt[@]}" latency --model llama-3.2-1b "${dummy[@]}" --backend megakernel,graph \
      --batch 2,4,8 --json "$OUT/latency_batch_llama-3.2-1b_$tag.json"
    if [ "$1" = bench ]; then
      stage 120 gpu_bench.log "${mt[@]}" throughput --model llama-3.2-1b --load-format dummy --backend graph \
        --batches 1,8,64,256 --input-len 1024 --output-len 64 \
        --json "$OUT/throughput_llama-3.2-1b_$tag.json" --plot "$OUT/throughput_llama-3.2-1b_$tag.png"
    fi
    stage 120 gpu_bench.log "${mt[@]}" latency --model llama-3.1-8b --load-format dummy --max-model-len 4096 \
      --backend megakernel,graph --json "$OUT/latency_llama-3.1-8b_$tag.json"
    ;;
  *)
    echo "usage: $0 tests|bench|latency" >&2
    exit 2
    ;;
esac
