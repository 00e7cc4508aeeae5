"""The fp32 oracle for bf16 greedy paths: every GPU backend's tokens are checked against it."""

from __future__ import annotations

import torch

from megatier.config import ModelConfig
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.weights import ModelWeights


def assert_greedy_under_fp32(
    cfg: ModelConfig,
    weights: ModelWeights,
    device: torch.device,
    tokens: list[list[int]],
    prefill: StepBatch,
    num_pages: int,
    page_size: int,
) -> None:
    """tokens [steps][seqs] came from greedy decoding after `prefill`. Feeding the same tokens to the fp32
    and bf16 references, each chosen token's fp32 logit must be within the step's bf16 noise (twice the
    largest |bf16 - fp32| logit difference) of the fp32 maximum: exact equality with either reference
    would fail on near-ties that rounding decides."""
    refs = []
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache.allocate(cfg, num_pages, page_size, dtype, device)
        cache.kv.fill_(float("nan"))
        refs.append(ReferenceExecutor(cfg, weights, cache=cache))
    lens, ones = prefill.query_lens, [1] * prefill.num_seqs
    steps = [prefill] + [
        StepBatch(tokens[s - 1], [n + s - 1 for n in lens], ones, prefill.page_tables) for s in range(1, len(tokens))
    ]
    for step, batch in enumerate(steps):
        exact, plain = (ref.forward(batch) for ref in refs)
        slack = 2 * (plain - exact).abs().amax(-1)
        chosen = exact.gather(-1, torch.tensor(tokens[step], device=exact.device)[:, None])[:, 0]
        assert (chosen >= exact.amax(-1) - slack).all(), (step, (exact.amax(-1) - chosen).tolist(), slack.tolist())
