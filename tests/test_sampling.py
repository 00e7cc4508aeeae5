"""Sampler and stop-string behaviour on synthetic logits and a byte-level tokenizer. The semantic tests
run on the device sampler (megatier.sampling.Sampler, batched) and on the host oracle (host_sampler)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from conftest import write_byte_tokenizer
from host_sampler import HostRow, host_sample
from megatier import MegatierError
from megatier.detokenizer import IncrementalDetokenizer
from megatier.sampling import Sampler, SampleRow, SamplingParams, uniform
from megatier.tokenizer import Tokenizer

VOCAB = 50


@dataclass
class Row:
    """One sequence to draw for: its settings, seed, prompt and the outputs it already has."""

    params: SamplingParams
    seed: int = 0
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    banned: tuple[int, ...] = ()


def pick(kind: str, logits: torch.Tensor, rows: list[Row]) -> list[tuple[int, dict[int, float] | None]]:
    """One draw per row of logits [R, VOCAB] by the host oracle or the device sampler. The device
    sampler learns a row's outputs (its penalty counts) by drawing them first from logits that force them."""
    if kind == "host":
        host = [HostRow(r.params, torch.Generator().manual_seed(r.seed), r.prompt, r.output, r.banned) for r in rows]
        return [(s.token_id, s.logprobs) for s in host_sample(logits, host)]
    sampler = Sampler(logits.shape[1], logits.device)
    for key, r in enumerate(rows):
        for position, token in enumerate(r.output):
            forced = torch.full((1, logits.shape[1]), -30.0)
            forced[0, token] = 100.0
            sampler.sample(forced, [SampleRow(key, r.params, r.seed, position, r.prompt)])
    device = [SampleRow(key, r.params, r.seed, len(r.output), r.prompt, r.banned) for key, r in enumerate(rows)]
    return sampler.sample(logits, device).result()


@pytest.fixture(params=["device", "host"])
def kind(request) -> str:
    return request.param


def draw(kind: str, logits: torch.Tensor, params: SamplingParams, seed: int, banned=()) -> int:
    return pick(kind, logits[None], [Row(params, seed, banned=tuple(banned))])[0][0]


def random_logits(seed: int) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax(kind):
    logits = random_logits(0)
    assert draw(kind, logits, SamplingParams(temperature=0), 1) == int(logits.argmax())


def test_seed_reproduces_and_different_seeds_differ(kind):
    logits = random_logits(1)
    p = SamplingParams(temperature=1.0)
    first = [draw(kind, logits, p, seed) for seed in range(40)]
    assert first == [draw(kind, logits, p, seed) for seed in range(40)]
    assert len(set(first)) > 5


def test_top_k_emits_exactly_the_k_best(kind):
    logits = random_logits(2)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    seen = {draw(kind, logits, SamplingParams(top_k=5, temperature=5.0), s) for s in range(400)}
    assert seen == allowed  # k-1 tokens, or k+1, fails


def test_top_p_keeps_the_token_that_crosses_the_threshold(kind):
    """Probabilities 0.3, 0.25, 0.2, 0.15, 0.1 with top_p 0.6: the third token takes the mass past 0.6,
    so it stays (vLLM, HF); the fourth and fifth never appear."""
    probs = torch.full((VOCAB,), 1e-12)
    probs[[11, 4, 30, 7, 21]] = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
    seen = {draw(kind, probs.log(), SamplingParams(top_p=0.6), s) for s in range(400)}
    assert seen == {11, 4, 30}


def test_min_p_drops_unlikely_tokens(kind):
    logits = random_logits(4)
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    seen = {draw(kind, logits, SamplingParams(min_p=0.2), s) for s in range(300)}
    assert seen <= allowed and len(seen) > 1


def test_banned_tokens_are_never_sampled(kind):
    logits = random_logits(5)
    best = int(logits.argmax())
    assert draw(kind, logits, SamplingParams(temperature=0), 0, banned=[best]) != best
    assert all(draw(kind, logits, SamplingParams(temperature=3.0), s, banned=[best]) != best for s in range(100))


def test_repetition_and_frequency_penalties_move_the_choice(kind):
    logits = torch.zeros(VOCAB)
    logits[7], logits[9] = 2.0, 1.9
    rep = Row(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=[7])
    freq = Row(SamplingParams(temperature=0, frequency_penalty=0.5), output=[7])
    plain = Row(SamplingParams(temperature=0), prompt=[7], output=[7])
    assert [t for t, _ in pick(kind, torch.stack([logits] * 3), [rep, freq, plain])] == [9, 9, 7]


PROMPT, OUTPUT = [7, 12], [7, 7, 7, 9]  # token 7: in the prompt and 3 times in the output; 12: prompt only


@pytest.mark.parametrize(
    "penalties, token, raw, penalized",
    [
        (dict(presence_penalty=0.5), 7, 2.0, 1.5),  # once, however often the token appeared
        (dict(frequency_penalty=0.3), 7, 2.0, 1.1),  # per occurrence
        (dict(presence_penalty=0.5, frequency_penalty=0.3), 9, 2.0, 1.2),
        (dict(presence_penalty=-0.4, frequency_penalty=-0.2), 7, 1.0, 2.0),  # negative: encourage
        (dict(presence_penalty=1.0, frequency_penalty=1.0), 12, 1.0, 1.0),  # prompt tokens: untouched
        (dict(repetition_penalty=1.6), 7, 2.0, 1.25),  # positive logits are divided
        (dict(repetition_penalty=1.6), 12, -1.0, -1.6),  # negative logits are multiplied
        (dict(repetition_penalty=0.5), 9, -1.0, -0.5),  # < 1 encourages either way
    ],
)
@pytest.mark.parametrize("temperature", [0.0, 1e-3])
def test_penalized_logit_has_exactly_the_expected_value(kind, penalties, token, raw, penalized, temperature):
    """A fresh token (never seen) placed just above, then just below, the penalized value must win,
    then lose: that pins the penalty to within 0.01, for greedy and for (near-greedy) sampling."""
    rival = 40
    for offset, winner in [(0.01, rival), (-0.01, token)]:
        logits = torch.full((VOCAB,), -30.0)
        logits[token], logits[rival] = raw, penalized + offset
        params = SamplingParams(temperature=temperature, **penalties)
        assert pick(kind, logits[None], [Row(params, 0, PROMPT, OUTPUT)])[0][0] == winner, (offset, penalties)


def test_logprobs_are_the_model_distribution(kind):
    logits = random_logits(6)
    token, logprobs = pick(kind, logits[None], [Row(SamplingParams(temperature=0.5, logprobs=3))])[0]
    expected = logits.log_softmax(-1)
    assert token in logprobs
    top3 = torch.topk(expected, 3).indices.tolist()
    assert set(top3) <= set(logprobs) and len(logprobs) <= 4
    for token, value in logprobs.items():
        assert value == pytest.approx(float(expected[token]), abs=1e-5)


def test_logit_bias_moves_the_choice_and_leaves_logprobs_raw(kind):
    logits = random_logits(7)
    best, rival = torch.topk(logits, 2).indices.tolist()
    gap = float(logits[best] - logits[rival])
    for bias, winner in [(gap + 0.01, rival), (gap - 0.01, best)]:
        params = SamplingParams(temperature=0, logit_bias={rival: bias}, logprobs=0)
        token, logprobs = pick(kind, logits[None], [Row(params)])[0]
        assert token == winner and logprobs.keys() == {winner}
        assert logprobs[winner] == pytest.approx(float(logits.log_softmax(-1)[winner]), abs=1e-5)
    banned = SamplingParams(temperature=0.7, logit_bias={best: -100, rival: -100})
    assert {best, rival}.isdisjoint(draw(kind, logits, banned, s) for s in range(100))


def test_uniform_is_a_fixed_function_of_seed_and_position():
    values = [uniform(seed, pos) for seed in (0, 1, 2**40 + 3, -5) for pos in range(250)]
    assert values == [uniform(seed, pos) for seed in (0, 1, 2**40 + 3, -5) for pos in range(250)]
    assert all(0 <= v < 1 for v in values) and len(set(values)) == len(values)
    assert abs(sum(values) / len(values) - 0.5) < 0.03
    assert sum(v < 0.1 for v in values) == pytest.approx(100, abs=30)


def test_device_draws_follow_the_distribution():
    """Over many seeds, each token comes up about as often as its probability says."""
    logits = random_logits(8)
    probs = logits.softmax(-1)
    rows = [SampleRow(seed, SamplingParams(temperature=1.0), seed, 3, []) for seed in range(4000)]
    tokens, _ = zip(*Sampler(VOCAB, torch.device("cpu")).sample(logits.expand(4000, -1), rows).result(), strict=True)
    freq = torch.bincount(torch.tensor(tokens), minlength=VOCAB) / 4000
    assert (freq - probs).abs().max() < 0.03
    assert set(tokens) >= set(torch.nonzero(probs > 0.02).flatten().tolist())


MIXED = [  # (params, seed): every stage of the sampler, and rows that use none of them
    (SamplingParams(temperature=0.7, top_p=0.9), 1),
    (SamplingParams(temperature=0), 2),
    (SamplingParams(temperature=1.3, top_k=4, min_p=0.05), 3),
    (SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.4, logit_bias={5: 3.0}), 4),
    (SamplingParams(temperature=1.0, logprobs=2), 5),
    (SamplingParams(temperature=0, frequency_penalty=0.5, logprobs=0), 6),
]


def test_seeded_draws_do_not_depend_on_the_batch():
    """A row's token is a function of its logits, settings, seed and position: alone, or in any order
    among rows with other settings, it is the same, step after step (penalty counts included)."""

    def run(order: list[int]) -> dict[int, list[int]]:
        sampler, got = Sampler(VOCAB, torch.device("cpu")), {i: [] for i in order}
        for position in range(12):
            logits = torch.stack([random_logits(100 * i + position) for i in order])
            rows = [SampleRow(i, MIXED[i][0], MIXED[i][1], position, [1, 2, 3]) for i in order]
            for i, (token, _) in zip(order, sampler.sample(logits, rows).result(), strict=True):
                got[i].append(token)
        return got

    together = run(list(range(len(MIXED))))
    assert run(list(reversed(range(len(MIXED))))) == together
    for i in range(len(MIXED)):
        assert run([i]) == {i: together[i]}
    assert len(set(together[0])) > 3  # sampled rows do vary


def test_greedy_rows_take_the_argmax_in_a_sampled_batch():
    logits = torch.stack([random_logits(s) for s in range(6)])
    rows = [SampleRow(i, SamplingParams(temperature=0 if i % 2 else 1.5, top_p=0.8), i, 0, []) for i in range(6)]
    tokens = [t for t, _ in Sampler(VOCAB, torch.device("cpu")).sample(logits, rows).result()]
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n must"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(stop=[""]), "stop strings"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(logit_bias={3: 100.5}), "logit_bias"),
        (dict(logit_bias={-1: 1}), "logit_bias"),
        (dict(logit_bias={3: "x"}), "logit_bias"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs, message):
    with pytest.raises(MegatierError, match=message):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(path)
    return Tokenizer(path)


def stream(
    tokenizer: Tokenizer, text: str, stop: list[str], include: bool = False
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `text` token by token; return every released delta."""
    detok = IncrementalDetokenizer(tokenizer, stop, include)
    deltas = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        detok.add(token)
        deltas.append(detok.release(final=False))
        if detok.stop_reason:
            break
    deltas.append(detok.release(final=True))
    return deltas, detok


def test_stop_string_cuts_exactly_and_never_leaks(tokenizer):
    deltas, detok = stream(tokenizer, "hello wonderful world", ["world", "wond"])
    assert "".join(deltas) == "hello " and detok.stop_reason == "wond"
    released = ""
    for d in deltas:  # no released prefix ever contains a character of the stop string
        released += d
        assert "w" not in released


def test_held_back_text_is_released_when_the_match_fails(tokenizer):
    deltas, detok = stream(tokenizer, "a wox b", ["wor"])
    assert detok.stop_reason is None
    assert "".join(deltas) == "a wox b"
    assert deltas[3] == "" and "wox" in "".join(deltas[:5])  # "w" waited for "o", then for "x"


def test_stop_string_inside_multibyte_text(tokenizer):
    deltas, detok = stream(tokenizer, "naïve café → ok", ["é →"], include=True)
    assert "".join(deltas) == "naïve café →" and detok.stop_reason == "é →"


@pytest.mark.parametrize("stops", [["bc", "abc"], ["abc", "bc"]])
def test_earliest_starting_stop_string_wins_when_two_complete_together(tokenizer, stops):
    deltas, detok = stream(tokenizer, "xxabcyy", stops)
    assert "".join(deltas) == "xx" and detok.stop_reason == "abc"


@pytest.fixture(scope="module")
def merged_tokenizer(tmp_path_factory) -> Tokenizer:
    """The byte tokenizer plus one added token "abc": a piece that completes two stop strings at once."""
    path = tmp_path_factory.mktemp("tok-merged")
    write_byte_tokenizer(path)
    tok = Tokenizer(path)
    tok.hf.add_tokens(["abc"])
    return tok


@pytest.mark.parametrize("stops", [["bc", "abc"], ["abc", "bc"], ["c", "xa"]])
def test_stop_strings_completing_in_one_piece(merged_tokenizer, stops):
    assert len(merged_tokenizer.encode("xxabcyy", add_special_tokens=False)) == 5  # x x abc y y
    deltas, detok = stream(merged_tokenizer, "xxabcyy", stops)
    first = min(stops, key="xxabcyy".index)
    assert "".join(deltas) == "xxabcyy"[: "xxabcyy".index(first)] and detok.stop_reason == first
