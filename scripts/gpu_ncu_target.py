"""A small program for Nsight Compute to profile: warm megakernel launches on dummy Llama-3.2-1B.

    ncu --clock-control none -k regex:megakernel --launch-skip 2 --launch-count 1 --section WarpStateStats \
        --section SourceCounters -o DIR/mk python3 scripts/gpu_ncu_target.py [--batch 1]

`--launches` + 1 plain launches (no CUDA graph: ncu replays each one alone) of one decode step each, from
a 32-token context; the first compiles the kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from megakernel_helpers import dummy_weights, garbage_kv, llama_1b_config, page_tables, random_prompts
from megatier.executors.base import StepBatch
from megatier.executors.megakernel.runner import MegakernelExecutor
from megatier.kv.pages import KVCache

CUDA = torch.device("cuda")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args()
    cfg = llama_1b_config()
    weights = dummy_weights(cfg, 0, torch.bfloat16, CUDA)
    cache = KVCache.allocate(cfg, 400, 16, torch.bfloat16, CUDA)
    garbage_kv(cache)
    ex = MegakernelExecutor(cfg, weights, cache=cache)
    lengths = [32] * args.batch
    tables = page_tables([n + 1 for n in lengths], 16, cache.num_pages)
    prompts = random_prompts(lengths, cfg.vocab_size, seed=1)
    batch = StepBatch([p[-1] for p in prompts], lengths, [1] * args.batch, tables)
    for _ in range(args.launches + 1):
        ex.forward(batch)
    print("launches done", flush=True)


if __name__ == "__main__":
    main()
