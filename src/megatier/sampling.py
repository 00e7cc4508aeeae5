"""SamplingParams and the Sampler: a step's logits -> next tokens (+ logprobs) on the device, batched.

Every row carries its own settings, and its random number comes from its sequence's seed and output
position, so a request's tokens depend only on its logits and its seed, never on which other requests
share the batch; the tokens reach the host through pinned memory without stalling the device.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton

from megatier.errors import MegatierError
from megatier.executors.base import upload
from megatier.kernels.sample import NUM_PARAMS, Flag, Param, SampleBuffers, fused_sample
from megatier.structured import StructuredOutput, apply_token_masks


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Defaults follow vLLM (temperature 1, 16 tokens)."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0: only the sampled token's)
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token (0: only the prompt token's)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # added to a token's logit before sampling (OpenAI's)
    structured_output: StructuredOutput | None = None  # a grammar the output must follow (structured.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        checks = [
            (self.n >= 1, "n must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 (disabled) or a positive integer"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs must be between 0 and 20",
            ),
            (_valid_bias(self.logit_bias), "logit_bias maps token ids (>= 0) to biases in [-100, 100]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                self.structured_output is None or isinstance(self.structured_output, StructuredOutput),
                "structured_output must be a StructuredOutput",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MegatierError(f"invalid sampling parameter: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Repetition, presence or frequency penalties: the sampler keeps token counts for them."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _valid_bias(bias: dict[int, float] | None) -> bool:
    if bias is None:
        return True
    return isinstance(bias, dict) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, int | float) and -100 <= b <= 100
        for t, b in bias.items()
    )


@dataclass
class SampleRow:
    """One sequence's draw this step."""

    key: object  # the sequence: its penalty counts live on the device under this key until release(key)
    params: SamplingParams
    seed: int
    position: int  # which of the sequence's outputs this token is: with the seed, it fixes the draw
    prompt_ids: list[int]  # for the repetition penalty; read when the key is first seen
    banned_ids: tuple[int, ...] = ()  # EOS and stop tokens while min_tokens is not reached


def _mix32(x: int) -> int:
    """A 32-bit integer hash with full avalanche (Wellons' lowbias32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def uniform(seed: int, position: int) -> float:
    """The number in [0, 1) that picks a sequence's output `position`: a counter-based hash of (seed,
    position), so a seed gives the same tokens in every run and whatever else shares the batch."""
    x = _mix32(seed_hash(seed) ^ (position & 0xFFFFFFFF))
    high, low = _mix32(x ^ 0x9E3779B9), _mix32(x ^ 0x7F4A7C15)
    return ((high << 21) | (low >> 11)) / 2.0**53


class Sampled:
    """One step's tokens: `tokens` [rows] int64 on the device (what the next step feeds), with the
    tokens and logprobs on their way to pinned host memory behind an event (on CPU: already there)."""

    def __init__(self, tokens: torch.Tensor, raw: torch.Tensor, top_n: list[int | None]):
        self.tokens, self.top_n = tokens, top_n
        wanted = [n for n in top_n if n is not None]
        ids, values = tokens[:, None], None
        if wanted:
            logp = raw.log_softmax(-1)
            values = logp.gather(1, ids)
            if max(wanted):
                top = logp.topk(max(wanted), dim=-1)
                ids, values = torch.cat((ids, top.indices), 1), torch.cat((values, top.values), 1)
        self._ids, self._values = _to_host(ids), None if values is None else _to_host(values)
        self._done = None
        if tokens.is_cuda:
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(tokens.device))

    def result(self) -> list[tuple[int, dict[int, float] | None]]:
        """Wait for the device; each row's token and, where asked, its logprob and the top-N alternatives
        (the model's own distribution, before penalties and filters, as vLLM reports)."""
        if self._done is not None:
            self._done.synchronize()
        ids = self._ids.tolist()
        values = None if self._values is None else self._values.tolist()
        out = []
        for row, n in enumerate(self.top_n):
            logprobs = None
            if n is not None:
                logprobs = {ids[row][0]: values[row][0]} | dict(
                    zip(ids[row][1 : 1 + n], values[row][1 : 1 + n], strict=True)
                )
            out.append((ids[row][0], logprobs))
        return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of device `t` in pinned host memory, queued without waiting."""
    if not t.is_cuda:
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def seed_hash(seed: int) -> int:
    """The per-sequence half of `uniform`'s hash: with the output position it gives a draw's number."""
    seed %= 2**64
    return _mix32(_mix32(seed & 0xFFFFFFFF) ^ (seed >> 32))


def _bits(value: float) -> int:
    """A float's fp32 bits as a signed int32 (how the fused sampler's parameter rows hold floats)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _int32(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


_FLAGS, _POSITION, _ENTRY_START, _ENTRY_COUNT, _GREEDY = (
    int(c) for c in (Param.FLAGS, Param.POSITION, Param.ENTRY_START, Param.ENTRY_COUNT, Flag.GREEDY)
)
_NEG_INF_BITS = _bits(float("-inf"))  # a logit_bias entry of -inf bans its token
_PADDING_ROW = [int(Flag.GREEDY)] + [0] * (NUM_PARAMS.value - 1)  # rows past the batch in a bucket
_PADDING_ROW[Param.SLOT] = -1


class Sampler:
    """Picks one token per row of a step's logits on their device, right behind the work computing them,
    without waiting for it. Penalties read per-sequence token counts kept on the device and updated by
    each draw; a row's token never depends on the other rows.

    On CUDA (or with fused=True, which tests use under TRITON_INTERPRET=1) the fused sampler
    (kernels/sample.py) runs: one launch for a greedy batch, 1 + 8 per search stage in use + 1 for a
    sampled one, over persistent buffers, captured as a CUDA graph per (bucket, stages) from its second
    use on. Each draw is the Gumbel-max of the kept tokens with noise hashed from (seed, position, token).
    Otherwise the torch path runs: every setting a per-row tensor, a stage no row uses skipped, and the
    draw is the inverse CDF at `uniform(seed, position)`."""

    def __init__(self, vocab_size: int, device: torch.device, fused: bool | None = None, capture: bool = True):
        self.vocab_size, self.device = vocab_size, device
        self.fused = device.type == "cuda" if fused is None else fused
        self.capture = capture and self.fused and device.type == "cuda"
        self._slots: dict[object, int] = {}  # key -> row of the count tensors
        self._free: list[int] = []
        self._counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)  # output tokens
        self._in_prompt = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self._rows: dict[object, tuple[SamplingParams, int, list[int], list[int]]] = {}  # fused: cached rows
        self._buffers: SampleBuffers | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph | None] = {}  # None: seen once, or capture failed
        self.graph_error: str | None = None

    def release(self, key: object) -> None:
        """Forget a finished sequence's penalty counts (its slot is reset when reused, in stream order)."""
        self._rows.pop(key, None)
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free.append(slot)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SampleRow], masks: torch.Tensor | None = None) -> Sampled:
        """Queue the choice of one token per row of fp32 `logits` [len(rows), vocab]; greedy rows
        (temperature 0 or top_k 1) take the argmax of the penalized logits. `masks` (host, from
        structured.token_masks) forbids tokens per row; logprobs still read the raw logits."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sequences")
        x = logits if masks is None else apply_token_masks(logits, upload(masks, self.device))
        tokens = self._sample_fused(x, rows) if self.fused else self._sample_torch(x, rows)
        return Sampled(tokens, logits, [r.params.logprobs for r in rows])

    def _sample_torch(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        penalized = [i for i, r in enumerate(rows) if r.params.has_penalties]
        slots = self._upload([self._slot(rows[i]) for i in penalized], torch.long) if penalized else None
        x = self._adjust(logits, rows, penalized, slots)
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = x.argmax(-1)
        else:
            tokens = self._draw(x, rows)
            if any(greedy):
                tokens = torch.where(self._upload(greedy, torch.bool), x.argmax(-1), tokens)
        if penalized:
            counted = tokens[self._upload(penalized, torch.long)]
            self._counts.index_put_((slots, counted), torch.ones_like(counted, dtype=torch.int32), accumulate=True)
        return tokens

    def _sample_fused(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """One parameter upload, then the fused kernels (a graph replay once captured); no host sync."""
        params, entries = array("i"), []
        used, greedy = 0, _GREEDY  # flags some row has; GREEDY while every row is greedy
        for r in rows:
            row, bias = self._fused_row(r)
            if bias or r.banned_ids:
                row[_ENTRY_START] = len(entries)
                entries += bias
                entries += [(t, _NEG_INF_BITS) for t in r.banned_ids]
                row[_ENTRY_COUNT] = len(entries) - row[_ENTRY_START]
            row[_POSITION] = r.position & 0x7FFFFFFF
            used |= row[_FLAGS]
            greedy &= row[_FLAGS]
            params.extend(row)
        bucket = triton.next_power_of_2(len(rows)) if self.capture else len(rows)
        for _ in range(bucket - len(rows)):
            params.extend(_PADDING_ROW)
        b = self._buffers_for(bucket, len(entries))
        self._copy_in(b.params[:bucket], torch.frombuffer(params, dtype=torch.int32).view(bucket, -1))
        if entries:
            self._copy_in(b.entries[: len(entries)], torch.tensor(entries, dtype=torch.int32))
        top_k, top_p = bool(used & Flag.USE_TOP_K), bool(used & Flag.USE_TOP_P)
        if b.logits is not None:
            b.logits[: len(rows)].copy_(logits)
            source = b.logits[:bucket]
        else:
            source = logits.contiguous()

        def run() -> None:
            fused_sample(source, b, self._counts, self._in_prompt, top_k, top_p, sample=not greedy)

        self._run((bucket, not greedy, top_k, top_p), run)
        return b.tokens[: len(rows)].clone()  # the next call overwrites the buffer

    def _fused_row(self, r: SampleRow) -> tuple[list[int], list[tuple[int, int]]]:
        """A copy of `r`'s parameter row (built once per sequence: flags, settings, penalty slot, seed
        hash) and its logit_bias entries (token, bias bits)."""
        cached = self._rows.get(r.key)
        if cached is None or cached[0] is not r.params or cached[1] != r.seed:
            p = r.params
            sampled = not p.greedy
            flags = (
                (Flag.GREEDY if p.greedy else 0)
                | (Flag.PENALTIES if p.has_penalties else 0)
                | (Flag.USE_TOP_K if sampled and 0 < p.top_k < self.vocab_size else 0)
                | (Flag.USE_TOP_P if sampled and p.top_p < 1 else 0)
                | (Flag.USE_MIN_P if sampled and p.min_p > 0 else 0)
            )
            row = [0] * NUM_PARAMS.value
            row[Param.FLAGS], row[Param.TOP_K] = int(flags), max(p.top_k, 0)
            for column, value in (
                (Param.TEMPERATURE, p.temperature or 1.0), (Param.TOP_P, p.top_p), (Param.MIN_P, p.min_p),
                (Param.REPETITION, p.repetition_penalty), (Param.PRESENCE, p.presence_penalty),
                (Param.FREQUENCY, p.frequency_penalty),
            ):  # fmt: skip
                row[column] = _bits(value)
            row[Param.SLOT] = self._slot(r) if p.has_penalties else -1
            row[Param.SEED] = _int32(seed_hash(r.seed))
            bias = [(t, _bits(float(v))) for t, v in (p.logit_bias or {}).items()]
            cached = self._rows[r.key] = (p, r.seed, row, bias)
        return list(cached[2]), cached[3]

    def _buffers_for(self, rows: int, entries: int) -> SampleBuffers:
        """The fused path's persistent buffers, grown (and captured graphs dropped) when too small."""
        b = self._buffers
        if b is None or b.rows < rows or b.entries.shape[0] < entries:
            rows = max(rows, b.rows if b else 1)
            entries = max(triton.next_power_of_2(max(entries, 1)), b.entries.shape[0] if b else 1)
            b = self._buffers = SampleBuffers(rows, self.vocab_size, entries, self.device, logits=self.capture)
            self._graphs.clear()
        return b

    def _copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Host -> persistent device buffer without waiting for queued work (from pinned memory)."""
        dst.copy_(src.pin_memory() if self.device.type == "cuda" else src, non_blocking=True)

    def _run(self, key: tuple, run: Callable[[], None]) -> None:
        """Launch eagerly; with capture, a key's second use captures a CUDA graph and every later one
        replays it (the first compiles the kernels; capturing does not run them, so no draw is repeated)."""
        if not self.capture:
            run()
            return
        if key not in self._graphs:
            self._graphs[key] = None
            run()
            return
        graph = self._graphs[key]
        if graph is None and self.graph_error is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    run()
            except Exception as e:  # capture unsupported here: eager launches still work
                self.graph_error = f"{type(e).__name__}: {e}"
                graph = None
            self._graphs[key] = graph
        if graph is None:
            run()
        else:
            graph.replay()

    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host list on the device without waiting for queued work (pageable memory would)."""
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _slot(self, row: SampleRow) -> int:
        """The count row of `row`'s sequence; a new one is cleared and marked with its prompt's tokens."""
        if row.key in self._slots:
            return self._slots[row.key]
        if not self._free:
            grow = max(8, self._counts.shape[0])
            self._free = list(range(self._counts.shape[0] + grow - 1, self._counts.shape[0] - 1, -1))
            self._counts = torch.cat((self._counts, self._counts.new_zeros((grow, self.vocab_size))))
            self._in_prompt = torch.cat((self._in_prompt, self._in_prompt.new_zeros((grow, self.vocab_size))))
            self._graphs.clear()  # they hold the old tables' addresses
        slot = self._slots[row.key] = self._free.pop()
        self._counts[slot].zero_()
        self._in_prompt[slot].zero_()
        self._in_prompt[slot, self._upload(row.prompt_ids, torch.long)] = True
        return slot

    def _adjust(
        self, logits: torch.Tensor, rows: list[SampleRow], penalized: list[int], slots: torch.Tensor | None
    ) -> torch.Tensor:
        """Repetition, presence and frequency penalties, then logit_bias, then bans (-inf), on a copy:
        `logits` stays raw for logprobs."""
        bias = [(i, t, b) for i, r in enumerate(rows) for t, b in (r.params.logit_bias or {}).items()]
        bans = [(i, t) for i, r in enumerate(rows) for t in r.banned_ids]
        if not (penalized or bias or bans):
            return logits
        x = logits.clone()
        if penalized:
            idx = self._upload(penalized, torch.long)
            p = [rows[i].params for i in penalized]
            rep, presence, frequency = self._upload(
                [[q.repetition_penalty for q in p], [q.presence_penalty for q in p], [q.frequency_penalty for q in p]],
                torch.float32,
            )[:, :, None]
            counts = self._counts[slots]
            seen = counts > 0
            xp = x[idx]
            xp = torch.where(seen | self._in_prompt[slots], torch.where(xp > 0, xp / rep, xp * rep), xp)
            x[idx] = xp - (seen * presence + counts * frequency)
        if bias:
            i, t, b = zip(*bias, strict=True)
            x.index_put_(
                (self._upload(i, torch.long), self._upload(t, torch.long)), self._upload(b, torch.float32), True
            )
        if bans:
            i, t = zip(*bans, strict=True)
            x[self._upload(i, torch.long), self._upload(t, torch.long)] = float("-inf")
        return x

    def _draw(self, x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Temperature, then the top-k, top-p and min-p masks (the host sampler's order); then the token
        whose interval of the cumulative distribution (fp64, vocabulary order) holds the row's number."""
        p = [r.params for r in rows]
        floats = self._upload(
            [[1.0 if q.greedy else q.temperature for q in p], [q.top_p for q in p], [q.min_p for q in p]], torch.float32
        )
        y = x / floats[0, :, None]
        top_k = [q.top_k if 0 < q.top_k < self.vocab_size else 0 for q in p]
        if any(top_k):
            k = self._upload(top_k, torch.long)
            kth = y.topk(max(top_k), dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])
            y = y.masked_fill((y < kth) & (k > 0)[:, None], float("-inf"))
        if any(q.top_p < 1 for q in p):
            top_p = floats[1, :, None]
            sorted_y, order = y.sort(dim=-1, descending=True)
            probs = sorted_y.softmax(-1)
            # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
            drop = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1)
            y = y.scatter(1, order, sorted_y.masked_fill(drop, float("-inf")))
        if any(q.min_p > 0 for q in p):
            probs = y.softmax(-1)
            y = y.masked_fill(probs < floats[2, :, None] * probs.amax(-1, keepdim=True), float("-inf"))
        cdf = y.softmax(-1).double().cumsum(-1)
        u = self._upload([uniform(r.seed, r.position) for r in rows], torch.float64)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        return picked.clamp_(max=self.vocab_size - 1)


@dataclass
class PromptLogprobs:
    """Per prompt position: the log-probability of the prompt token given the tokens before it, with the
    top-N alternatives, and its rank (1: the most likely). Position 0 has None: nothing predicts it."""

    logprobs: list[dict[int, float] | None] = field(default_factory=lambda: [None])
    ranks: list[int | None] = field(default_factory=lambda: [None])

    def __len__(self) -> int:
        return len(self.logprobs)

    def extend(self, logits: torch.Tensor, tokens: list[int], top_n: int) -> None:
        """Score the next len(tokens) prompt positions from their predecessors' fp32 logits [len(tokens), vocab]
        (the model's own distribution, as vLLM reports)."""
        logp = logits.log_softmax(-1)
        ids = torch.tensor(tokens, device=logits.device)
        chosen = logp.gather(-1, ids[:, None])
        ranks = (logp > chosen).sum(-1) + 1
        top_values, top_ids = logp.topk(top_n, dim=-1)
        rows = zip(tokens, chosen[:, 0].tolist(), top_ids.tolist(), top_values.tolist(), strict=True)
        for token, value, alt_ids, alt_values in rows:
            self.logprobs.append({token: value} | dict(zip(alt_ids, alt_values, strict=True)))
        self.ranks.extend(ranks.tolist())
