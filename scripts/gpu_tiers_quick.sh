#!/usr/bin/env bash
# The short tiered-KV GPU run that fits what is left of a session's device time: the tiered GPU tests,
# the CPU kernel against the host's read bandwidth (with and without PCIe traffic) and the PCIe paths,
# then the headline bench tiers case (Llama-3.2-1B shape, batch 16 x 32K, HBM = 1/8 of the KV).
set -uo pipefail
OUT=${OUT:-bench/results}
export PYTHONPATH=src PYTHONUNBUFFERED=1 MEGATIER_CACHE_DIR=/tmp/megatier-cache
: "${MEGATIER_COMMIT:?set MEGATIER_COMMIT}"
export MEGATIER_COMMIT
echo "# commit $MEGATIER_COMMIT | $(nvidia-smi --query-gpu=name --format=csv,noheader) | $(date -u +%FT%TZ)" | tee "$OUT/gpu_tiers_quick.log"
timeout 70 python3 -m pytest -v -rA -p no:cacheprovider --timeout 40 --timeout-method thread tests/test_tiered_kv.py -m gpu 2>&1 | tee -a "$OUT/gpu_tiers_quick.log" | tail -12
timeout 45 python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu_tiers_quick.log"
import json, os, torch
from megatier.bench.common import record, write_json
from megatier.bench.tier_micro import kernel_vs_probe, pcie
from megatier.config import load_config
from megatier.loader import resolve_model
cfg, dev = load_config(resolve_model("llama-3.2-1b")), torch.device("cuda")
res = {"cpu_kernel_vs_probe": kernel_vs_probe(dev, kv_bytes=2 << 30), "pcie": pcie(cfg, dev)}
print(json.dumps(res, default=str))
write_json(os.environ["OUT"] + "/tier_micro.json", record("tier_micro", dev, {"model": "llama-3.2-1b"}, res))
PY
timeout 125 python3 -m megatier.cli bench tiers --model llama-3.2-1b --batch 16 --context 32768 --hbm-fraction 0.125 \
  --steps 4 --repeats 1 --methods gpu-only offload-fetch static-dense megatier-dense sparse-offload-fetch megatier-sparse \
  --json "$OUT/tiers_llama-3.2-1b_32k.json" 2>&1 | grep -v Warn | tee -a "$OUT/gpu_tiers_quick.log"
