"""SamplingParams and the sampler: logits -> next tokens (+ logprobs), one row per sequence.

Every row carries its own settings and its own torch.Generator, so a request's tokens depend only on
its logits and its seed, never on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatier.errors import MegatierError


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
        ]
        for ok, message in checks:
            if not ok:
                raise MegatierError(f"invalid sampling parameter: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the host between steps (penalties, logprobs)."""
        return (
            self.greedy
            and self.logprobs is None
            and not self.logit_bias
            and self.presence_penalty == 0
            and self.frequency_penalty == 0
            and self.repetition_penalty == 1
        )


def _valid_bias(bias: dict[int, float] | None) -> bool:
    if bias is None:
        return True
    return isinstance(bias, dict) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(b, int | float) and -100 <= b <= 100
        for t, b in bias.items()
    )


@dataclass
class SampleRow:
    """What the sampler needs to know about one sequence this step."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    banned_ids: tuple[int, ...] = ()  # EOS and stop tokens while min_tokens is not reached


@dataclass
class Sampled:
    token_id: int
    logprobs: dict[int, float] | None  # sampled token and the top-N alternatives


def _apply_penalties(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """Repetition, presence and frequency penalties, then logit_bias, in place."""
    p = row.params
    if p.repetition_penalty != 1 and (row.prompt_ids or row.output_ids):
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        ids, counts = torch.tensor(row.output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (excluded tokens get -inf)."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled]:
    """Pick one token per row of fp32 `logits` [num_rows, vocab]."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sequences")
    out: list[Sampled | None] = [None] * len(rows)
    # Plain greedy rows need nothing but an argmax: one batched call (one device sync) for all of them.
    plain = [i for i, row in enumerate(rows) if row.params.plain_greedy and not row.banned_ids]
    if plain:
        for i, token in zip(plain, logits[plain].argmax(-1).tolist(), strict=True):
            out[i] = Sampled(token, None)
    for i, row in enumerate(rows):
        if out[i] is not None:
            continue
        p = row.params
        raw = logits[i]
        x = _apply_penalties(raw.clone(), row)
        if row.banned_ids:
            x[list(row.banned_ids)] = float("-inf")
        if p.greedy:
            token = int(x.argmax())
        else:
            probs = _filter(x, p).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=row.generator))
        out[i] = Sampled(token, _logprobs(raw, token, p.logprobs))
    return out


def _logprobs(raw: torch.Tensor, token: int, top_n: int | None) -> dict[int, float] | None:
    """Log-probabilities under the model's own distribution (before sampling filters), as vLLM reports."""
    if top_n is None:
        return None
    logp = raw.log_softmax(-1)
    result = {token: float(logp[token])}
    if top_n:
        values, ids = logp.topk(top_n)
        result |= {int(t): float(v) for t, v in zip(ids, values, strict=True)}
    return result


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
