"""What every executor receives: one step over a batch of sequences, each adding new tokens; and the
optional greedy fast path, k decode steps on the device per host sync."""

from __future__ import annotations

from dataclasses import dataclass
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
    of the sequences listed in `all_logits` (what prompt logprobs score), in batch order."""

    token_ids: list[int]  # all new tokens, sequence after sequence
    starts: list[int]
    query_lens: list[int]
    page_tables: list[list[int]]
    all_logits: frozenset[int] = frozenset()  # sequences whose every new token's logits come back

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


class Executor(Protocol):
    """Runs the model over a paged KV cache. Constructed as `Cls(cfg, weights, cache=KVCache)`: the
    caller allocates the cache, so executors of one model (prefill and decode paths) can share it.
    `forward` returns fp32 logits [sum(batch.logit_counts()), vocab]: one row per sequence, or one per
    new token for the sequences in `batch.all_logits`."""

    name: str
    cache: KVCache
    page_size: int
    num_pages: int
    device: torch.device

    def forward(self, batch: StepBatch) -> torch.Tensor: ...


@dataclass
class GreedyChunk:
    """Greedy tokens [num_steps, B] that the device may still be computing: `tokens` is a host tensor
    that a non-blocking copy (or the kernel itself) fills, valid once `done` (None: already valid) has
    completed; with `rows`, the chunk is those rows of `tokens` (a ring the kernel writes)."""

    tokens: torch.Tensor
    done: torch.cuda.Event | None = None
    rows: torch.Tensor | None = None

    @classmethod
    def copy_of(cls, tokens: torch.Tensor) -> GreedyChunk:
        """Start copying device `tokens` to pinned host memory behind the work queued on the current
        stream, without waiting for it."""
        if tokens.device.type != "cuda":
            return cls(tokens.clone())
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tokens.device))
        return cls(host, done)

    @classmethod
    def rows_of(cls, ring: torch.Tensor, first: int, num_steps: int, stream: torch.cuda.Stream) -> GreedyChunk:
        """Rows first, first + 1, ... (wrapping) of a pinned host ring that work queued on `stream` writes."""
        done = torch.cuda.Event()
        done.record(stream)
        return cls(ring, done, torch.arange(first, first + num_steps) % ring.shape[0])

    def result(self) -> list[list[int]]:
        """Wait for the chunk; its tokens by step, then by sequence."""
        if self.done is not None:
            self.done.synchronize()
        return (self.tokens if self.rows is None else self.tokens[self.rows]).tolist()


class AsyncGreedyDecoder(Protocol):
    """An executor that can queue greedy decode chunks, so the host works while the device decodes.
    It offers the synchronous `decode_greedy(batch, num_steps) -> [num_steps, B] int64 tensor` too.

    `decode_greedy_async(batch, num_steps)` queues `num_steps` greedy steps of a decode batch (one new
    token per sequence at `starts`; page tables hold room for num_steps tokens from there) on the
    current CUDA stream and returns without waiting for the device; step 0 feeds `batch.token_ids`,
    each later step the previous argmax. `result()` gives every row's tokens, also of rows whose
    sequence has ended since (the caller drops them). Read each chunk before 1024 more steps are
    queued (an executor may keep the tokens in a ring that long).

    `first_tokens`: a device tensor [B] that step 0 feeds instead of `batch.token_ids`, read in stream
    order, so a chunk can be queued behind the prefill that samples those tokens before the host has
    seen them (the engine then reads them while the chunk runs).

    `resume=True`: the same sequences, in the same order, continue from the state the previous chunk
    left on the device (each one's next input token and position). `token_ids` is not read (the engine
    passes []); `starts` must equal the previous chunk's starts + its num_steps, else MegatierError;
    page tables may have grown (only the new entries need uploading). A `forward` call in between ends
    what a resume can continue from. Since everything runs in order on one stream, a later step that
    reuses the pages of a sequence that ended meanwhile runs after the chunk that still writes them."""

    def decode_greedy_async(
        self, batch: StepBatch, num_steps: int, *, resume: bool = False, first_tokens: torch.Tensor | None = None
    ) -> GreedyChunk: ...
