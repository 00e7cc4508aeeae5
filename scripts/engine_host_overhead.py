"""Host work per engine step: Engine.step() over an executor whose forward costs nothing.

What is timed is everything the host does per decode step (schedule, the StepBatch, queueing the
sampler, reading the tokens, stop checks, detokenization): in the overlap loop the device hides it only
while it is shorter than a device step. Uses the embedded SmolLM2 tokenizer and real text, so
detokenization costs what it costs in serving. On CPU the sampler's tensor work counts too.

    .venv/bin/python scripts/engine_host_overhead.py [--batch 1,8] [--steps 2000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from megatier.config import load_config
from megatier.engine import Engine
from megatier.executors.base import StepBatch
from megatier.kv.pages import KVCache
from megatier.loader import resolve_model
from megatier.sampling import SamplingParams
from megatier.tokenizer import Tokenizer

TEXT = (
    "The engine takes requests, schedules them in pages of the KV cache, and runs the model one step at a "
    "time. Greedy decoding feeds each chosen token back on the device, so many steps need one host sync. "
)


class InstantExecutor:
    """Every sequence generates `text` over and over (its logits make the next token of it the best)."""

    name = "instant"
    page_size = 16
    device = torch.device("cpu")

    def __init__(self, cfg, text: list[int], num_pages: int):
        self.cfg, self.text, self.num_pages = cfg, text, num_pages
        self.cache = KVCache.allocate(cfg, num_pages, self.page_size, torch.float32, self.device)  # never touched

    def forward(self, batch: StepBatch) -> torch.Tensor:
        logits = torch.zeros(batch.num_seqs, self.cfg.vocab_size)
        tokens = [self.text[c % len(self.text)] for c in batch.context_lens]
        logits[torch.arange(batch.num_seqs), torch.tensor(tokens)] = 10.0
        return logits


def measure(tokenizer, cfg, batch: int, params: SamplingParams, steps: int, profile: bool) -> float:
    """Microseconds of host time per engine step, after a warm-up."""
    text = tokenizer.encode(TEXT * 4)
    max_len = 64 + steps + 40
    num_pages = batch * -(-max_len // InstantExecutor.page_size)
    executor = InstantExecutor(cfg, text, num_pages)
    engine = Engine(executor, tokenizer, eos_token_ids=(), max_model_len=max_len, max_num_seqs=batch)
    for _ in range(batch):
        engine.add_request(text[: 64 - 1], params)
    for _ in range(20):  # prefill, then the decode path warms up
        engine.step()
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    for _ in range(steps):
        engine.step()
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    path = resolve_model(None)
    tokenizer, cfg = Tokenizer(path), load_config(path)
    kinds = {
        "greedy": SamplingParams(temperature=0, max_tokens=args.steps + 30, ignore_eos=True),
        "T=0.7 top-p 0.95": SamplingParams(temperature=0.7, top_p=0.95, max_tokens=args.steps + 30, ignore_eos=True),
    }
    for batch in (int(b) for b in args.batch.split(",")):
        for name, params in kinds.items():
            us = min(measure(tokenizer, cfg, batch, params, args.steps, False) for _ in range(3))
            print(f"batch {batch:3d} {name:18s} {us:8.1f} us per step")
            if args.profile:
                measure(tokenizer, cfg, batch, params, args.steps, True)


if __name__ == "__main__":
    main()
