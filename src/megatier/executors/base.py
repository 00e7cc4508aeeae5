"""What every executor receives: one step over a batch of sequences, each adding new tokens, some of
which only the device knows yet (sampled by the step before, still in flight)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

import torch

from megatier.kv.pages import KVCache


@dataclass
class StepBatch:
    """Sequence i feeds tokens at positions [starts[i], starts[i] + query_lens[i]) and attends to every
    position below the end. A prefill chunk and a decode step are the same thing with different lengths.
    The KV of those positions is written into the pages of `page_tables[i]`, which the scheduler has
    already sized. Logits come back for the last new token of each sequence, and for every new token
    of the sequences listed in `all_logits` (what prompt logprobs score), in batch order.

    `fed` holds tokens the host has not seen (the previous step's samples, on the device): they go at
    indices `fed_at` of token_ids, which hold placeholders there. Executors read token ids through
    `token_tensor` or `feed_into`, so a step can be queued before the one it continues has finished."""

    token_ids: list[int]  # all new tokens, sequence after sequence
    starts: list[int]
    query_lens: list[int]
    page_tables: list[list[int]]
    all_logits: frozenset[int] = frozenset()  # sequences whose every new token's logits come back
    fed: torch.Tensor | None = None  # int64 tokens on the device, one per entry of fed_at
    fed_at: list[int] = field(default_factory=list)

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

    def logit_counts(self) -> list[int]:
        """Rows of `forward`'s output per sequence: query_lens[i] for those in all_logits, else 1."""
        return [n if i in self.all_logits else 1 for i, n in enumerate(self.query_lens)]

    def last_logit_rows(self) -> list[int]:
        """The row of `forward`'s output that holds each sequence's last new token."""
        return [end - 1 for end in accumulate(self.logit_counts())]

    def token_tensor(self, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """token_ids on `device` with the fed tokens in place, queued without waiting for the device."""
        tokens = upload(torch.tensor(self.token_ids, dtype=dtype), device)
        self.feed_into(tokens)
        return tokens

    def feed_into(self, tokens: torch.Tensor) -> None:
        """Write the fed tokens into `tokens` (token_ids as uploaded to the device), in stream order."""
        if self.fed is None:
            return
        if self.fed_at == list(range(len(self.fed_at))):  # a decode batch continuing the last one
            tokens[: len(self.fed_at)].copy_(self.fed)
        else:
            at = upload(torch.tensor(self.fed_at, dtype=torch.long), tokens.device)
            tokens.index_copy_(0, at, self.fed.to(tokens.dtype))


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that never waits for queued work: from pageable memory the driver may wait
    for the stream before it stages the copy, which would stall the host behind the step in flight."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Executor(Protocol):
    """Runs the model over a paged KV cache. Constructed as `Cls(cfg, weights, cache=KVCache)`: the
    caller allocates the cache, so executors of one model (prefill and decode paths) can share it.
    `forward` returns fp32 logits [sum(batch.logit_counts()), vocab] on the device: one row per
    sequence, or one per new token for the sequences in `batch.all_logits`. It queues its work on the
    current stream and returns without waiting for the device (the engine samples behind it and
    schedules the next step meanwhile); each call returns a tensor of its own."""

    name: str
    cache: KVCache
    page_size: int
    num_pages: int
    device: torch.device
    weight_bytes: int  # the weights as this executor holds them: about what a decode step streams

    def forward(self, batch: StepBatch) -> torch.Tensor: ...
