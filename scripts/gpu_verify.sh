#!/usr/bin/env bash
# One short device call that checks what changed most since the last full GPU run, in priority order:
# the engine's overlap loop on graph and megakernel, the graph executor, tiered KV in the CUDA graph,
# the megakernel and backend tests, bench latency greedy against T=0.7/top-p 0.95 on the same warm
# machine, and the headline bench tiers case. Each stage is time-boxed so a failure leaves the rest.
# Usage: MEGATIER_COMMIT=<hash> bash scripts/gpu_verify.sh   (logs and JSON go to $OUT)
set -uo pipefail
OUT=${OUT:-bench/results}
export PYTHONPATH=src PYTHONUNBUFFERED=1 MEGATIER_CACHE_DIR=/tmp/megatier-cache
: "${MEGATIER_COMMIT:?set MEGATIER_COMMIT}"
export MEGATIER_COMMIT
log="$OUT/gpu_verify.log"
echo "# commit $MEGATIER_COMMIT | $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) | $(date -u +%FT%TZ) | bash scripts/gpu_verify.sh" | tee "$log"
stage() {  # stage SECONDS COMMAND...
  local limit=$1
  shift
  echo "== $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "== exit $?" >>"$log"
}
pytest=(python3 -m pytest -v -rA -p no:cacheprovider --timeout 60 --timeout-method thread)
stage 130 "${pytest[@]}" -m gpu tests/test_engine_pipeline.py tests/test_graph_executor.py tests/test_tiered_kv.py
stage 130 "${pytest[@]}" tests/test_megakernel_gpu.py tests/test_backends.py
lat=(python3 -m megatier.cli bench latency --model llama-3.2-1b --load-format dummy --max-model-len 4096
  --backend megakernel,graph --batch 1,8 --output-len 128)
stage 50 "${lat[@]}" --json "$OUT/latency_greedy.json"
stage 50 "${lat[@]}" --temperature 0.7 --top-p 0.95 --json "$OUT/latency_t07.json"
stage 90 python3 -m megatier.cli bench tiers --model llama-3.2-1b --batch 16 --context 32768 --hbm-fraction 0.125 \
  --steps 4 --repeats 1 --methods gpu-only offload-fetch megatier-dense sparse-offload-fetch megatier-sparse \
  --json "$OUT/tiers_llama-3.2-1b_32k.json"
grep -E "FAILED|ERROR|passed|failed|== exit|us/tok|µs|tok/s" "$log" | grep -v "PASSED" | tail -60
