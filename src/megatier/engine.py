"""The engine: requests in, one step at a time: schedule -> executor.forward -> sample -> detokenize.

It is single-threaded on purpose; the HTTP server drives it from one background thread. Each step
queues a forward pass and the sampler behind it on the device, then takes the tokens of the step
before (the overlap loop): while the device computes step N + 1, the host applies stop rules,
detokenizes and streams step N. Step N + 1 was scheduled before step N's tokens were known, so it
feeds them from the device, and a sequence that step N ends has its token from step N + 1 dropped.
A step that samples for a grammar-constrained sequence (structured.py) is taken before the next one is
scheduled: that sequence's next token mask needs the token.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

import torch
from llguidance import LLMatcher

from megatier.detokenizer import IncrementalDetokenizer
from megatier.errors import MegatierError
from megatier.executors.base import Executor, StepBatch, upload
from megatier.sampling import PromptLogprobs, Sampled, Sampler, SampleRow, SamplingParams
from megatier.scheduler import ScheduledBatch, Scheduler, Sequence, Status
from megatier.structured import Grammars, token_masks
from megatier.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """A request's completions (`outputs[i]` for n > 1); `.text` etc. read the first one."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


@dataclass
class SequenceUpdate:
    """What one step did for one sequence: new tokens, newly releasable text, and whether it ended."""

    request_id: str
    index: int
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # on a sequence's first update, if they were asked for


@dataclass
class _Launched:
    """A step queued on the device: the sequences it samples for, in the order of `sampled`'s rows."""

    seqs: list[Sequence]
    sampled: Sampled | None

    @property
    def constrained(self) -> bool:
        return any(s.matcher is not None for s in self.seqs)

    def feed(self, seqs: list[Sequence]) -> torch.Tensor:
        """The device tokens this step samples for `seqs` (each of them one of its own)."""
        if seqs == self.seqs[: len(seqs)]:
            return self.sampled.tokens[: len(seqs)]
        row = {id(s): i for i, s in enumerate(self.seqs)}
        index = upload(torch.tensor([row[id(s)] for s in seqs]), self.sampled.tokens.device)
        return self.sampled.tokens[index]


class Engine:
    def __init__(
        self,
        executor: Executor,
        tokenizer: Tokenizer | None,
        *,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        overlap: bool = True,
        seed: int = 0,
    ):
        self.executor = executor
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.overlap = overlap  # False: each step's tokens are taken before the next step is scheduled
        self.scheduler = Scheduler(
            executor.cache.allocator, executor.page_size, max_num_seqs, max_num_batched_tokens, max_model_len
        )
        self.sampler = Sampler(executor.cfg.vocab_size, executor.device)
        self.requests: dict[str, list[Sequence]] = {}
        self._seeds = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        # Steps queued on the device whose tokens the host has not taken, oldest first (at most one
        # between calls to step()). A sequence that ends meanwhile has pages freed that such a step still
        # writes; all device work is queued on one stream, so a later step reusing them runs after it.
        self._in_flight: deque[_Launched] = deque()

    # -- request lifecycle ---------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises MegatierError for prompts the model cannot take."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise MegatierError(f"request id {request_id!r} is already in use")
        self.check_prompt(prompt_ids)
        self.check_logit_bias(params)
        first = self._matcher(params)  # compiles the grammar once: the other sequences copy it
        seqs = []
        for i in range(params.n):
            seed = (
                params.seed + i if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
            )
            detok = IncrementalDetokenizer(
                self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
            )
            matcher = first.deep_copy() if first is not None and i > 0 else first
            seqs.append(Sequence(request_id, i, list(prompt_ids), params, seed, detok, matcher=matcher))
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raise MegatierError unless the model can take `prompt_ids`. Reads only fixed settings, so the
        HTTP server calls it from its own thread to reject a bad prompt before it reaches the engine."""
        if not prompt_ids:
            raise MegatierError("the prompt is empty")
        vocab = self.executor.cfg.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise MegatierError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt_ids) >= self.max_model_len:
            raise MegatierError(
                f"the prompt has {len(prompt_ids)} tokens; the maximum context length is {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )

    def check_params(self, params: SamplingParams) -> None:
        """Raise MegatierError for settings this model cannot take (SamplingParams checks the rest); reads
        only fixed settings, like check_prompt."""
        self.check_logit_bias(params)
        self.check_structured_output(params)

    def check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.executor.cfg.vocab_size
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise MegatierError(f"logit_bias token id {bad} is outside the vocabulary (0..{vocab - 1})")

    def check_structured_output(self, params: SamplingParams) -> None:
        """Compiles the grammar (the server calls it from its own thread, so a bad one never queues)."""
        self._matcher(params)

    def _matcher(self, params: SamplingParams) -> LLMatcher | None:
        if params.structured_output is None:
            return None
        if self.tokenizer is None:
            raise MegatierError("structured output needs the model's tokenizer, and this model has none")
        return self.grammars.matcher(params.structured_output)

    @cached_property
    def grammars(self) -> Grammars:
        """The tokenizer compiled for structured output, on the first constrained request."""
        return Grammars(self.tokenizer, self.executor.cfg.vocab_size, self.eos_token_ids)

    def abort_request(self, request_id: str) -> None:
        """Cancel a request now and free its KV pages (no-op for unknown or finished requests)."""
        for seq in self.requests.pop(request_id, []):
            if seq.status is not Status.FINISHED:
                self._finish_seq(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- one step -----------------------------------------------------------------------------------------

    def step(self) -> list[SequenceUpdate]:
        """Queue the next step, then take the tokens of the one before it (with `overlap`; else of this
        one), so the host's stop checks and streaming run while the device computes."""
        updates = []
        if self._in_flight and self._in_flight[-1].constrained:
            updates = self._take(self._in_flight.popleft())
        batch = self.scheduler.schedule()
        if batch.seqs:
            self._in_flight.append(self._launch(batch))
        if len(self._in_flight) > (1 if self.overlap and batch.seqs else 0):
            updates += self._take(self._in_flight.popleft())
        return updates

    def _launch(self, batch: ScheduledBatch) -> _Launched:
        """Queue the forward pass and the sampler behind it; nothing waits for the device (but prompt
        logprobs, which read the prompt's logits)."""
        step = self._step_batch(batch)
        logits = self._score_prompts(batch.seqs, step, self.executor.forward(step))
        ready = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            seq.num_computed += n
            if seq.num_uncomputed == 0:  # the whole prompt (or the last token) is in: sample the next one
                ready.append(row)
        if not ready:
            return _Launched([], None)
        seqs = [batch.seqs[r] for r in ready]
        rows = [self._sample_row(seq) for seq in seqs]
        if len(ready) < len(batch.seqs):  # some prompts are not all in yet
            logits = logits[upload(torch.tensor(ready), logits.device)]
        matchers = [s.matcher for s in seqs]
        masks = token_masks(matchers, logits.shape[1]) if any(m is not None for m in matchers) else None
        sampled = self.sampler.sample(logits, rows, masks)
        for seq in seqs:
            seq.num_pending += 1
        return _Launched(seqs, sampled)

    def _take(self, launched: _Launched) -> list[SequenceUpdate]:
        """Wait for a step's tokens and append them; a sequence that ended (or was aborted) since the step
        was queued gets none."""
        if launched.sampled is None:
            return []
        updates = []
        for seq, (token, logprobs) in zip(launched.seqs, launched.sampled.result(), strict=True):
            if seq.status is not Status.FINISHED:
                seq.num_pending -= 1
                updates.append(self._append(seq, token, logprobs))
        return updates

    def _step_batch(self, batch: ScheduledBatch) -> StepBatch:
        """The executor's view of a scheduled step; a prompt being scored gets every new token's logits.
        A decode token that the step in flight samples is fed from the device."""
        token_ids, fed_at, fed = [], [], []
        for s, n in zip(batch.seqs, batch.num_tokens, strict=True):
            known = s.token_ids[s.num_computed : s.num_computed + n]
            if len(known) < n:  # n == 1: its newest token is still on the device
                fed_at.append(len(token_ids))
                fed.append(s)
                known = [0]
            token_ids += known
        return StepBatch(
            token_ids=token_ids,
            starts=[s.num_computed for s in batch.seqs],
            query_lens=batch.num_tokens,
            page_tables=[s.table.pages for s in batch.seqs],
            all_logits=frozenset(i for i, s in enumerate(batch.seqs) if s.scoring_prompt),
            fed=self._in_flight[-1].feed(fed) if fed else None,
            fed_at=fed_at,
        )

    def _score_prompts(self, seqs: list[Sequence], step: StepBatch, logits: torch.Tensor) -> torch.Tensor:
        """Add the prompt logprobs that this step's rows give (the row of position p predicts the prompt
        token at p + 1; a prompt split over steps is scored chunk by chunk); return each sequence's
        last-token logits."""
        if not step.all_logits:
            return logits
        row = 0
        for i, (seq, count) in enumerate(zip(seqs, step.logit_counts(), strict=True)):
            if i in step.all_logits:
                scored, start = len(seq.prompt_logprobs), step.starts[i]
                first, end = scored - start - 1, min(count, len(seq.prompt_ids) - start - 1)
                if first < end:
                    targets = seq.prompt_ids[scored : scored + end - first]
                    seq.prompt_logprobs.extend(logits[row + first : row + end], targets, seq.params.prompt_logprobs)
            row += count
        return logits[step.last_logit_rows()]

    def _sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        position = seq.num_output + seq.num_pending  # the output this draw makes
        banned: tuple[int, ...] = ()
        if position < p.min_tokens:
            banned = tuple(p.stop_token_ids) + (() if p.ignore_eos else self.eos_token_ids)
        return SampleRow(seq, p, seq.seed, position, seq.prompt_ids, banned)

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> SequenceUpdate:
        """Add a sampled token and apply the stop rules to it."""
        first = seq.num_output == 0
        seq.token_ids.append(token)
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        reason, stop_reason = self._check_stop(seq, token)
        if reason:
            self._finish_seq(seq, reason, stop_reason)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        finished = seq.status is Status.FINISHED
        update = SequenceUpdate(
            seq.request_id,
            seq.index,
            [token],
            seq.detok.release(final=finished),
            finished,
            seq.finish_reason,
            seq.stop_reason,
            [logprobs] if logprobs is not None else [],
            seq.prompt_logprobs if first else None,
        )
        if finished and all(s.status is Status.FINISHED for s in self.requests.get(seq.request_id, [])):
            self.requests.pop(seq.request_id, None)
        return update

    def _finish_seq(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """End a sequence: its pages and its sampler state go back."""
        self.scheduler.finish(seq, reason, stop_reason)
        self.sampler.release(seq)

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, str | int | None]:
        p = seq.params
        n_out = seq.num_output
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
        seq.detok.add(token, check_stop=n_out >= p.min_tokens)
        if seq.detok.stop_reason is not None:
            return "stop", seq.detok.stop_reason
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar admits nothing more
            return "stop", None
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return "length", None
        if len(seq.token_ids) >= self.max_model_len:
            return "length", None
        return None, None
