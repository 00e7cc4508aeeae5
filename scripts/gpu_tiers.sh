#!/usr/bin/env bash
# One GPU-machine run of the tiered KV benchmarks (issue #5), each stage time-boxed so one failure
# leaves the others' results:
#   1. Llama-3.2-1B shape: micro-benchmarks (PCIe, CPU attention vs threads, GPU split-KV, disk), a
#      logits check of tiered dense against all-HBM, and every method at 8K/16K/32K context, batch 16,
#      HBM budget = 1/8 of the KV;
#   2. Llama-3.1-8B shape: every method at batch 16 x 8K context (16 GiB of KV, 2 GiB in HBM);
#   3. Llama-3.2-1B shape at 32K: the HBM budget at 1/16 and 1/4 (for the throughput-vs-HBM plot).
# Usage (device tool): bash scripts/gpu_tiers.sh  -> JSON and log under $OUT (default bench/results).
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 MEGATIER_CACHE_DIR=/tmp/megatier-cache
PY=${PY:-python3}
LOG="$OUT/tiers_log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  gcc --version | head -1
} 2>&1 | tee "$LOG"

stage() {
  local limit=$1
  shift
  echo "== $*" | tee -a "$LOG"
  timeout "$limit" $PY -m megatier.cli bench tiers "$@" 2>&1 | tee -a "$LOG"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

stage 220 --model llama-3.2-1b --batch 16 --context 8192 16384 32768 --hbm-fraction 0.125 --steps 4 --micro --check \
  --json "$OUT/tiers_llama-3.2-1b.json"
stage 170 --model llama-3.1-8b --batch 16 --context 8192 --hbm-fraction 0.125 --steps 4 --json "$OUT/tiers_llama-3.1-8b.json"
stage 130 --model llama-3.2-1b --batch 16 --context 32768 --hbm-fraction 0.0625 0.25 --steps 4 \
  --methods offload-fetch static-dense megatier-dense static-sparse megatier-sparse \
  --json "$OUT/tiers_llama-3.2-1b_hbm.json"
