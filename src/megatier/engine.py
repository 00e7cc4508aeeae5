"""The engine: requests in, one step at a time: schedule -> executor.forward -> sample -> detokenize.

It is single-threaded on purpose; the HTTP server drives it from one background thread. Plain-greedy
decode batches run k steps on the device per host sync; with an executor that can queue such chunks
(`decode_greedy_async`), the engine queues the next chunk before it reads the current one's tokens, so
stop checks, detokenization and scheduling overlap the device's work instead of idling it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from megatier.detokenizer import IncrementalDetokenizer
from megatier.errors import MegatierError
from megatier.executors.base import Executor, GreedyChunk, StepBatch
from megatier.sampling import PromptLogprobs, SampleRow, SamplingParams, sample
from megatier.scheduler import ScheduledBatch, Scheduler, Sequence, Status
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
class _Chunk:
    """Greedy decode steps queued on the device whose tokens the host has not taken yet."""

    seqs: list[Sequence]
    num_steps: int
    tokens: GreedyChunk


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
        decode_steps_per_sync: int = 8,
        seed: int = 0,
    ):
        self.executor = executor
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.decode_steps_per_sync = decode_steps_per_sync
        self.scheduler = Scheduler(executor.cache.allocator, executor.page_size, max_num_seqs, max_num_batched_tokens)
        self.requests: dict[str, list[Sequence]] = {}
        self._seeds = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        # At most one chunk is in flight between steps. Its sequences' num_computed and token_ids do not
        # count it yet; it runs for all of them, so a sequence that ends meanwhile (stop, abort) has pages
        # freed that the chunk still writes. All device work is queued on one CUDA stream, so a later
        # step that reuses those pages runs after the chunk; on CPU, executors run eagerly.
        self._in_flight: _Chunk | None = None

    # -- request lifecycle ---------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises MegatierError for prompts the model cannot take."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise MegatierError(f"request id {request_id!r} is already in use")
        self.check_prompt(prompt_ids)
        self.check_params(params)
        seqs = []
        for i in range(params.n):
            seed = (
                params.seed + i if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
            )
            generator = None if params.greedy else torch.Generator(self.executor.device).manual_seed(seed)
            detok = IncrementalDetokenizer(
                self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
            )
            seqs.append(Sequence(request_id, i, list(prompt_ids), params, generator, detok))
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
        vocab = self.executor.cfg.vocab_size
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise MegatierError(f"logit_bias token id {bad} is outside the vocabulary (0..{vocab - 1})")

    def abort_request(self, request_id: str) -> None:
        """Cancel a request now and free its KV pages (no-op for unknown or finished requests)."""
        for seq in self.requests.pop(request_id, []):
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- one step -----------------------------------------------------------------------------------------

    def step(self) -> list[SequenceUpdate]:
        if self._in_flight is not None:
            chunk, self._in_flight = self._in_flight, None
            return self._pipeline(chunk)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        multi = self._greedy_steps(batch.seqs)
        if multi > 1:
            if hasattr(self.executor, "decode_greedy_async"):
                return self._pipeline(self._queue_chunk(batch.seqs, multi, resume=False))
            return self._decode_multi(batch.seqs, multi)
        step = self._step_batch(batch)
        logits = self._score_prompts(batch.seqs, step, self.executor.forward(step))
        ready = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            seq.num_computed += n
            if seq.num_uncomputed == 0:  # the whole prompt (or the last token) is in: sample the next one
                ready.append((row, seq))
        if not ready:
            return []
        if len(ready) == len(batch.seqs):
            handoff = self._first_chunk_on_device(batch.seqs, logits)
            if handoff is not None:
                first, self._in_flight = handoff
                return [self._append(seq, [t], []) for seq, t in zip(batch.seqs, first, strict=True)]
        rows = [self._sample_row(seq) for _, seq in ready]
        sampled = sample(logits[[r for r, _ in ready]], rows)
        return [
            self._append(seq, [s.token_id], [s.logprobs] if s.logprobs else [])
            for (_, seq), s in zip(ready, sampled, strict=True)
        ]

    def _step_batch(self, batch: ScheduledBatch) -> StepBatch:
        """The executor's view of a scheduled step; a prompt being scored gets every new token's logits."""
        return StepBatch(
            token_ids=[
                t for s, n in zip(batch.seqs, batch.num_tokens, strict=True) for t in s.token_ids[s.num_computed :][:n]
            ],
            starts=[s.num_computed for s in batch.seqs],
            query_lens=batch.num_tokens,
            page_tables=[s.table.pages for s in batch.seqs],
            all_logits=frozenset(i for i, s in enumerate(batch.seqs) if s.scoring_prompt),
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
        banned: tuple[int, ...] = ()
        if seq.num_output < p.min_tokens:
            banned = tuple(p.stop_token_ids) + (() if p.ignore_eos else self.eos_token_ids)
        return SampleRow(p, seq.generator, seq.prompt_ids, seq.output_ids, banned)

    def _greedy_steps(self, seqs: list[Sequence], ahead: int = 0, pending: int = 0) -> int:
        """How many greedy decode steps the device may run for `seqs`, counted from `ahead` tokens past
        what the host has taken (the steps of a chunk in flight, assumed kept by every sequence), with
        `pending` more sampled on the device but not appended yet (they hold no KV); 0 when it must
        not. Pages for them are ensured."""
        # A tiered KV store plans placement on the host every step, so it takes one step per sync.
        multi_step = hasattr(self.executor, "decode_greedy") and not self.executor.cache.tiered
        if not multi_step or self.decode_steps_per_sync <= 1 or self.scheduler.waiting:
            return 0
        # Someone else waits for a turn; or, with a chunk in flight, a sequence ended (it left `running`).
        if len(seqs) != len(self.scheduler.running):
            return 0
        # Each has one token without KV (its newest output) and owes no more tokens before EOS may end it.
        if not all(
            s.params.plain_greedy
            and s.num_uncomputed + pending == 1
            and s.num_output + pending >= max(1, s.params.min_tokens)
            for s in seqs
        ):
            return 0
        # Run until the longest-lived sequence would stop; one that stops sooner has its extra tokens
        # dropped (the batch keeps full speed instead of falling back to one step per sync). No sequence
        # may write KV past the context limit, though.
        wanted = max(self._tokens_left(s) for s in seqs) - ahead - pending
        room = min(self.max_model_len - s.num_computed for s in seqs) - ahead
        k = min(self.decode_steps_per_sync, wanted, room)
        if k < 1 or not self.scheduler.ensure_capacity(seqs, ahead + k):
            return 0
        return k

    def _tokens_left(self, seq: Sequence) -> int:
        limit = self.max_model_len - len(seq.token_ids)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output)
        return limit

    def _queue_chunk(self, seqs: list[Sequence], k: int, resume: bool, ahead: int = 0) -> _Chunk:
        batch = StepBatch(
            token_ids=[] if resume else [s.token_ids[-1] for s in seqs],
            starts=[s.num_computed + ahead for s in seqs],
            query_lens=[1] * len(seqs),
            page_tables=[s.table.pages for s in seqs],
        )
        return _Chunk(seqs, k, self.executor.decode_greedy_async(batch, k, resume=resume))

    def _first_chunk_on_device(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], _Chunk] | None:
        """Every sequence of the batch has just taken its prompt: where they decode plain greedy (and
        the executor queues chunks), their first tokens stay on the device as the argmax and the first
        decode chunk is queued behind it, so the device goes on decoding while the host reads those
        tokens. The tokens and the chunk in flight, or None."""
        if not hasattr(self.executor, "decode_greedy_async"):
            return None
        k = self._greedy_steps(seqs, pending=1)
        if k <= 1:
            return None
        first = logits.argmax(-1)
        tokens = GreedyChunk.copy_of(first[None])  # queued before the chunk: readable before it ends
        batch = StepBatch(
            token_ids=[],
            starts=[s.num_computed for s in seqs],
            query_lens=[1] * len(seqs),
            page_tables=[s.table.pages for s in seqs],
        )
        chunk = _Chunk(seqs, k, self.executor.decode_greedy_async(batch, k, first_tokens=first))
        return tokens.result()[0], chunk

    def _pipeline(self, chunk: _Chunk) -> list[SequenceUpdate]:
        """Queue the chunk after `chunk` when it is safe (the same sequences, all still running, alone,
        plain greedy, pages ensured), then take `chunk`'s tokens while the device runs the next one."""
        k = self._greedy_steps(chunk.seqs, ahead=chunk.num_steps)
        if k:
            self._in_flight = self._queue_chunk(chunk.seqs, k, resume=True, ahead=chunk.num_steps)
        return self._take(chunk.seqs, chunk.num_steps, chunk.tokens.result())

    def _decode_multi(self, seqs: list[Sequence], k: int) -> list[SequenceUpdate]:
        tokens = self.executor.decode_greedy(
            StepBatch(
                token_ids=[s.token_ids[-1] for s in seqs],
                starts=[s.num_computed for s in seqs],
                query_lens=[1] * len(seqs),
                page_tables=[s.table.pages for s in seqs],
            ),
            k,
        ).tolist()
        return self._take(seqs, k, tokens)

    def _take(self, seqs: list[Sequence], k: int, tokens: list[list[int]]) -> list[SequenceUpdate]:
        """Append k greedy steps' tokens [k][len(seqs)]; a sequence that ended (or was aborted) while
        they were computed gets none."""
        updates = []
        for col, seq in enumerate(seqs):
            if seq.status is Status.RUNNING:
                seq.num_computed += k
                updates.append(self._append(seq, [row[col] for row in tokens], []))
        return updates

    def _append(self, seq: Sequence, new_tokens: list[int], new_logprobs: list[dict[int, float]]) -> SequenceUpdate:
        """Add sampled tokens one by one, stopping at the first that ends the sequence. Tokens computed
        past the end by a multi-step decode are dropped; their KV went with the freed pages."""
        p = seq.params
        first = seq.num_output == 0
        taken: list[int] = []
        for token in new_tokens:
            seq.token_ids.append(token)
            taken.append(token)
            reason, stop_reason = self._check_stop(seq, token)
            if reason:
                self.scheduler.finish(seq, reason, stop_reason)
                break
        seq.logprobs.extend(new_logprobs[: len(taken)])
        finished = seq.status is Status.FINISHED
        update = SequenceUpdate(
            seq.request_id,
            seq.index,
            taken,
            seq.detok.release(final=finished),
            finished,
            seq.finish_reason,
            seq.stop_reason,
            new_logprobs[: len(taken)] if p.logprobs is not None else [],
            seq.prompt_logprobs if first else None,
        )
        if finished and all(s.status is Status.FINISHED for s in self.requests.get(seq.request_id, [])):
            self.requests.pop(seq.request_id, None)
        return update

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
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return "length", None
        if len(seq.token_ids) >= self.max_model_len:
            return "length", None
        return None, None
