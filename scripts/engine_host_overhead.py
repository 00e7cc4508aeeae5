"""Host work per greedy sync: Engine.step() over an executor that returns its tokens at once.

What is timed is everything the host does per chunk of k greedy tokens (schedule, page checks, the
StepBatch, reading the tokens, stop checks, detokenization): with decode_greedy the device idles that
long per sync; with decode_greedy_async it overlaps the next chunk. Uses the embedded SmolLM2
tokenizer and real text, so detokenization costs what it costs in serving.

    .venv/bin/python scripts/engine_host_overhead.py [--batch 1,8] [--steps 8] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from megatier.config import load_config
from megatier.engine import Engine
from megatier.executors.base import GreedyChunk, StepBatch
from megatier.loader import resolve_model
from megatier.sampling import SamplingParams
from megatier.tokenizer import Tokenizer

TEXT = (
    "The engine takes requests, schedules them in pages of the KV cache, and runs the model one step at a "
    "time. Greedy decoding feeds each chosen token back on the device, so many steps need one host sync. "
)


class InstantExecutor:
    """Every sequence generates `text` over and over; decode chunks cost the host nothing."""

    name = "instant"
    page_size = 16
    device = torch.device("cpu")

    def __init__(self, cfg, text: list[int], num_pages: int, with_async: bool):
        self.cfg, self.text, self.num_pages = cfg, text, num_pages
        if with_async:
            self.decode_greedy_async = self._decode_greedy_async

    def _tokens(self, starts: list[int], num_steps: int) -> torch.Tensor:
        n = len(self.text)
        return torch.tensor([[self.text[(s + i) % n] for s in starts] for i in range(num_steps)])

    def forward(self, batch: StepBatch) -> torch.Tensor:
        logits = torch.zeros(batch.num_seqs, self.cfg.vocab_size)
        logits[torch.arange(batch.num_seqs), self._tokens(batch.context_lens, 1)[0]] = 1.0
        return logits

    def decode_greedy(self, batch: StepBatch, num_steps: int) -> torch.Tensor:
        return self._tokens([s + 1 for s in batch.starts], num_steps)

    def _decode_greedy_async(self, batch: StepBatch, num_steps: int, *, resume: bool = False) -> GreedyChunk:
        return GreedyChunk(self.decode_greedy(batch, num_steps))


def measure(tokenizer, cfg, batch: int, steps: int, with_async: bool, chunks: int, profile: bool) -> float:
    """Microseconds of host time per chunk of `steps` tokens, after a warm-up."""
    text = tokenizer.encode(TEXT * 4)
    max_len = 64 + steps * (chunks + 40)
    num_pages = batch * -(-max_len // InstantExecutor.page_size)
    executor = InstantExecutor(cfg, text, num_pages, with_async)
    engine = Engine(
        executor, tokenizer, eos_token_ids=(), max_model_len=max_len, max_num_seqs=batch, decode_steps_per_sync=steps
    )
    params = SamplingParams(temperature=0, max_tokens=max_len - 64, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(text[: 64 - 1], params)
    for _ in range(20):  # prefill, then the decode path warms up
        engine.step()
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    for _ in range(chunks):
        engine.step()
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    return (time.perf_counter() - t0) / chunks * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=8, help="decode_steps_per_sync")
    ap.add_argument("--chunks", type=int, default=2000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    path = resolve_model(None)
    tokenizer, cfg = Tokenizer(path), load_config(path)
    for batch in (int(b) for b in args.batch.split(",")):
        for with_async in (False, True):
            us = min(measure(tokenizer, cfg, batch, args.steps, with_async, args.chunks, False) for _ in range(3))
            api = "decode_greedy_async" if with_async else "decode_greedy"
            print(f"batch {batch:3d} {api:20s} {us:8.1f} us per sync, {us / args.steps:6.1f} us per token step")
        if args.profile:
            measure(tokenizer, cfg, batch, args.steps, True, args.chunks, True)


if __name__ == "__main__":
    main()
