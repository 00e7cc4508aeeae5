"""What every executor receives: one step over a batch of sequences, each adding new tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megatier.kv.pages import KVCache


@dataclass
class StepBatch:
    """Sequence i feeds tokens at positions [starts[i], starts[i] + query_lens[i]) and attends to every
    position below the end. A prefill chunk and a decode step are the same thing with different lengths.
    The KV of those positions is written into the pages of `page_tables[i]`, which the scheduler has
    already sized. Logits come back for the last new token of each sequence."""

    token_ids: list[int]  # all new tokens, sequence after sequence
    starts: list[int]
    query_lens: list[int]
    page_tables: list[list[int]]

    @property
    def num_seqs(self) -> int:
        return len(self.starts)

    @property
    def context_lens(self) -> list[int]:
        return [s + n for s, n in zip(self.starts, self.query_lens, strict=True)]

    def positions(self) -> list[range]:
        return [range(s, s + n) for s, n in zip(self.starts, self.query_lens, strict=True)]

    def is_decode(self) -> bool:
        return all(n == 1 for n in self.query_lens)


class Executor(Protocol):
    """Runs the model over a paged KV cache. Constructed as `Cls(cfg, weights, cache=KVCache)`: the
    caller allocates the cache, so executors of one model (prefill and decode paths) can share it.
    `forward` returns fp32 logits [num_seqs, vocab]."""

    name: str
    cache: KVCache
    page_size: int
    num_pages: int
    device: torch.device

    def forward(self, batch: StepBatch) -> torch.Tensor: ...
