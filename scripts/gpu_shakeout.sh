#!/usr/bin/env bash
# A short first GPU run of new tiered-KV code: its GPU tests, then a small bench tiers case per method.
set -uo pipefail
OUT=${OUT:-bench/results}
export PYTHONPATH=src PYTHONUNBUFFERED=1 MEGATIER_CACHE_DIR=/tmp/megatier-cache
: "${MEGATIER_COMMIT:?set MEGATIER_COMMIT}"
export MEGATIER_COMMIT
echo "# commit $MEGATIER_COMMIT | $(nvidia-smi --query-gpu=name --format=csv,noheader) | $(date -u +%FT%TZ)" | tee "$OUT/shakeout.log"
timeout 200 python3 -m pytest -v -rA -p no:cacheprovider --timeout 150 tests/test_tiered_kv.py -m gpu 2>&1 | tee -a "$OUT/shakeout.log"
timeout 230 python3 -m megatier.cli bench tiers --model llama-3.2-1b --batch 16 --context 8192 --hbm-fraction 0.125 \
  --steps 4 --repeats 1 --check --json "$OUT/tiers_shakeout.json" 2>&1 | tee -a "$OUT/shakeout.log"
