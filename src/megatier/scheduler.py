"""Continuous batching: which sequences run this step, how many tokens each, and where their KV goes.

Every step, running sequences in decode each get one token first (so streams keep their pace); the
remaining token budget goes to prompt chunks, oldest request first, so long prompts are prefilled in
pieces between decode steps. When the KV cache is full, the newest running sequence is preempted: its
pages are freed and it is recomputed later from its prompt and the tokens it already produced.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from llguidance import LLMatcher

from megatier.detokenizer import IncrementalDetokenizer
from megatier.kv.pages import PageAllocator, PageTable
from megatier.sampling import PromptLogprobs, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generated completion: a request with n > 1 has n sequences."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # with each output's position, fixes the sampler's random numbers
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)  # prompt, then every sampled token
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # with params.prompt_logprobs; filled during prefill
    table: PageTable = field(default_factory=PageTable)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_pending: int = 0  # tokens sampled by steps still in flight: on the device, not in token_ids yet
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    matcher: LLMatcher | None = None  # structured output: where the output is in its grammar

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = PromptLogprobs()

    @property
    def scoring_prompt(self) -> bool:
        """Its prompt logprobs are wanted and not all taken yet (a preempted sequence keeps those it has)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_output(self) -> int:
        """len(output_ids) without copying them: the engine asks once per token."""
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed

    @property
    def in_decode(self) -> bool:
        return self.num_uncomputed == 1 and self.num_output + self.num_pending > 0

    def ends_with_pending(self, max_model_len: int) -> bool:
        """Its tokens in flight reach max_tokens or the context limit: another step would be wasted."""
        total = len(self.token_ids) + self.num_pending
        max_tokens = self.params.max_tokens
        return total >= max_model_len or (max_tokens is not None and total - len(self.prompt_ids) >= max_tokens)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # new tokens per sequence this step


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ):
        # The KV store's allocator: a tiered one also frees the slices of each freed page.
        self.allocator = allocator
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_pages_in_use(self) -> int:
        return self.allocator.num_pages - self.allocator.num_free

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark `seq` finished and free its pages; safe to call on a waiting or running sequence."""
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.table.pages)
        seq.table = PageTable()
        seq.num_computed = 0

    def _grow(self, seq: Sequence, total_tokens: int) -> bool:
        """Give `seq` pages for `total_tokens` tokens; False (and nothing allocated) if too few are free."""
        need = seq.table.pages_needed(total_tokens, self.page_size)
        if need > self.allocator.num_free:
            return False
        seq.table.pages.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _make_room(self, seq: Sequence, total_tokens: int, keep: list[Sequence], preempted: list[Sequence]) -> bool:
        """Grow running `seq` to `total_tokens`, preempting the newest running sequences not in `keep`.
        False if `seq` itself had to go."""
        while not self._grow(seq, total_tokens):
            victim = max((s for s in self.running if s not in keep), key=lambda s: s.arrival_time)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def schedule(self) -> ScheduledBatch:
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted: list[Sequence] = []
        budget = self.max_num_batched_tokens

        # 1. One token for every running sequence in decode (not one that the steps in flight end).
        for seq in [s for s in self.running if s.in_decode and not s.ends_with_pending(self.max_model_len)]:
            if budget == 0:
                break
            if seq.status is Status.RUNNING and self._make_room(seq, seq.num_computed + 1, seqs, preempted):
                seqs.append(seq)
                counts.append(1)
                budget -= 1

        # 2. Prompt chunks: first running sequences part-way through their prompt, then waiting ones.
        for seq in [s for s in self.running if not s.in_decode] + list(self.waiting):
            if budget == 0 or seq in preempted:
                break
            n = min(seq.num_uncomputed, budget)
            if seq.status is Status.RUNNING:
                if not self._make_room(seq, seq.num_computed + n, seqs, preempted):
                    break
            elif len(self.running) >= self.max_num_seqs or not self._grow(seq, seq.num_computed + n):
                break
            else:
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts)
