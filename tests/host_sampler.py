"""The host sampler, one row at a time with torch.Generator: the oracle of sampling semantics that
megatier.sampling.Sampler (batched, on the device) is tested against. Not the same random numbers, so
compared by the sets of tokens a filter lets through and by exact penalized values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatier.sampling import SamplingParams


@dataclass
class HostRow:
    """What the sampler needs to know about one sequence this step."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    banned_ids: tuple[int, ...] = ()  # EOS and stop tokens while min_tokens is not reached


@dataclass
class HostSampled:
    token_id: int
    logprobs: dict[int, float] | None  # sampled token and the top-N alternatives


def _apply_penalties(logits: torch.Tensor, row: HostRow) -> torch.Tensor:
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
        # Drop a token when the tokens strictly above it already reach top_p (tokens of equal logits
        # stay or go together); the best token always stays.
        first_equal = torch.searchsorted(-sorted_logits, -sorted_logits)
        drop = (probs.cumsum(-1) - probs)[first_equal] >= p.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def host_sample(logits: torch.Tensor, rows: list[HostRow]) -> list[HostSampled]:
    """Pick one token per row of fp32 `logits` [num_rows, vocab]."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sequences")
    out = []
    for row, raw in zip(rows, logits, strict=True):
        p = row.params
        x = _apply_penalties(raw.clone(), row)
        if row.banned_ids:
            x[list(row.banned_ids)] = float("-inf")
        if p.greedy:
            token = int(x.argmax())
        else:
            probs = _filter(x, p).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=row.generator))
        out.append(HostSampled(token, _logprobs(raw, token, p.logprobs)))
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
