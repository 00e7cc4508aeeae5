#!/usr/bin/env bash
# The GPU-machine runs of the tiered KV benchmarks (issue #17), each stage time-boxed so one failure
# leaves the others' results. Everything runs on the graph executor.
#   bash scripts/gpu_tiers.sh 1b    Llama-3.2-1B shape: micro-benchmarks (host read bandwidth and the CPU
#                                   kernel beside it, with and without PCIe traffic; PCIe copies and the
#                                   gather kernel), a logits check against all-HBM, every method at batch
#                                   16 x 32K with HBM = 1/8 of the KV, then 8K/16K and the HBM sweep
#   bash scripts/gpu_tiers.sh 8b    Llama-3.1-8B shape: every method at batch 16 x 8K and x 32K
#   bash scripts/gpu_tiers.sh dense Llama-3.2-1B shape, batch 16 x 32K: offload-fetch, then megatier-dense at
#                                   fixed PCIe shares beside the balanced one (is the balancer's share the best?)
# Pass the commit as MEGATIER_COMMIT (the tree travels without .git; see gpu_final.sh). JSON, PNG and the
# log go to $OUT (default bench/results).
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 MEGATIER_CACHE_DIR=/tmp/megatier-cache
: "${MEGATIER_COMMIT:?set MEGATIER_COMMIT to the commit under test}"
export MEGATIER_COMMIT
PY=${PY:-python3}
LOG="$OUT/tiers_log.txt"
{
  echo "# commit $MEGATIER_COMMIT | $(date -u +%FT%TZ) | bash scripts/gpu_tiers.sh $*"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

stage() {
  local limit=$1
  shift
  echo "== megatier bench tiers $*" | tee -a "$LOG"
  timeout "$limit" $PY -m megatier.cli bench tiers "$@" 2>&1 | tee -a "$LOG"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

case "${1:-}" in
  1b)
    stage 300 --model llama-3.2-1b --batch 16 --context 32768 --hbm-fraction 0.125 --micro --check \
      --json "$OUT/tiers_llama-3.2-1b.json" --plot-dir "$OUT"
    stage 200 --model llama-3.2-1b --batch 16 --context 8192 16384 --hbm-fraction 0.125 --repeats 2 \
      --methods gpu-only offload-fetch megatier-dense sparse-offload-fetch megatier-sparse \
      --json "$OUT/tiers_llama-3.2-1b_contexts.json"
    ;;
  8b)
    stage 280 --model llama-3.1-8b --batch 16 --context 8192 --hbm-fraction 0.125 --repeats 2 \
      --json "$OUT/tiers_llama-3.1-8b_8k.json"
    stage 280 --model llama-3.1-8b --batch 16 --context 32768 --hbm-fraction 0.125 --repeats 1 \
      --methods offload-fetch megatier-dense sparse-offload-fetch megatier-sparse --json "$OUT/tiers_llama-3.1-8b_32k.json"
    ;;
  dense)
    stage 60 --model llama-3.2-1b --batch 16 --context 32768 --hbm-fraction 0.125 --steps 4 --repeats 1 \
      --methods offload-fetch megatier-dense --json "$OUT/tiers_dense_balanced.json"
    for share in 0.05 0.2 0.35 0.5; do
      stage 45 --model llama-3.2-1b --batch 16 --context 32768 --hbm-fraction 0.125 --steps 4 --repeats 1 \
        --methods megatier-dense --pcie-share "$share" --json "$OUT/tiers_dense_share$share.json"
    done
    ;;
  *)
    echo "usage: $0 1b|8b|dense" >&2
    exit 2
    ;;
esac
