"""Sampler and stop-string behaviour on synthetic logits and a byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from conftest import write_byte_tokenizer
from megatier import MegatierError
from megatier.detokenizer import IncrementalDetokenizer
from megatier.sampling import SampleRow, SamplingParams, sample
from megatier.tokenizer import Tokenizer

VOCAB = 50


def draw(logits: torch.Tensor, params: SamplingParams, seed: int, banned=()) -> int:
    row = SampleRow(params, torch.Generator().manual_seed(seed), [], [], tuple(banned))
    return sample(logits[None], [row])[0].token_id


def random_logits(seed: int) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax():
    logits = random_logits(0)
    assert draw(logits, SamplingParams(temperature=0), 1) == int(logits.argmax())


def test_seed_reproduces_and_different_seeds_differ():
    logits = random_logits(1)
    p = SamplingParams(temperature=1.0)
    first = [draw(logits, p, seed) for seed in range(40)]
    assert first == [draw(logits, p, seed) for seed in range(40)]
    assert len(set(first)) > 5


def test_top_k_emits_exactly_the_k_best():
    logits = random_logits(2)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    seen = {draw(logits, SamplingParams(top_k=5, temperature=5.0), s) for s in range(400)}
    assert seen == allowed  # k-1 tokens, or k+1, fails


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    """Probabilities 0.3, 0.25, 0.2, 0.15, 0.1 with top_p 0.6: the third token takes the mass past 0.6,
    so it stays (vLLM, HF); the fourth and fifth never appear."""
    probs = torch.full((VOCAB,), 1e-12)
    probs[[11, 4, 30, 7, 21]] = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
    seen = {draw(probs.log(), SamplingParams(top_p=0.6), s) for s in range(400)}
    assert seen == {11, 4, 30}


def test_min_p_drops_unlikely_tokens():
    logits = random_logits(4)
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    seen = {draw(logits, SamplingParams(min_p=0.2), s) for s in range(300)}
    assert seen <= allowed and len(seen) > 1


def test_banned_tokens_are_never_sampled():
    logits = random_logits(5)
    best = int(logits.argmax())
    assert draw(logits, SamplingParams(temperature=0), 0, banned=[best]) != best
    assert all(draw(logits, SamplingParams(temperature=3.0), s, banned=[best]) != best for s in range(100))


def test_repetition_and_frequency_penalties_move_the_choice():
    logits = torch.zeros(VOCAB)
    logits[7], logits[9] = 2.0, 1.9
    rep = SampleRow(SamplingParams(temperature=0, repetition_penalty=1.2), None, [7], [])
    freq = SampleRow(SamplingParams(temperature=0, frequency_penalty=0.5), None, [], [7])
    plain = SampleRow(SamplingParams(temperature=0), None, [7], [7])
    assert [s.token_id for s in sample(torch.stack([logits] * 3), [rep, freq, plain])] == [9, 9, 7]


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
def test_penalized_logit_has_exactly_the_expected_value(penalties, token, raw, penalized, temperature):
    """A fresh token (never seen) placed just above, then just below, the penalized value must win,
    then lose: that pins the penalty to within 0.01, for greedy and for (near-greedy) sampling."""
    rival = 40
    for offset, winner in [(0.01, rival), (-0.01, token)]:
        logits = torch.full((VOCAB,), -30.0)
        logits[token], logits[rival] = raw, penalized + offset
        params = SamplingParams(temperature=temperature, **penalties)
        row = SampleRow(params, torch.Generator().manual_seed(0), PROMPT, OUTPUT)
        assert sample(logits[None], [row])[0].token_id == winner, (offset, penalties)


def test_logprobs_are_the_model_distribution():
    logits = random_logits(6)
    row = SampleRow(SamplingParams(temperature=0.5, logprobs=3), torch.Generator().manual_seed(0), [], [])
    out = sample(logits[None], [row])[0]
    expected = logits.log_softmax(-1)
    assert out.token_id in out.logprobs
    top3 = torch.topk(expected, 3).indices.tolist()
    assert set(top3) <= set(out.logprobs)
    for token, value in out.logprobs.items():
        assert value == pytest.approx(float(expected[token]), abs=1e-5)


def test_logit_bias_moves_the_choice_and_leaves_logprobs_raw():
    logits = random_logits(7)
    best, rival = torch.topk(logits, 2).indices.tolist()
    gap = float(logits[best] - logits[rival])
    for bias, winner in [(gap + 0.01, rival), (gap - 0.01, best)]:
        params = SamplingParams(temperature=0, logit_bias={rival: bias}, logprobs=0)
        assert not params.plain_greedy
        out = sample(logits[None], [SampleRow(params, None, [], [])])[0]
        assert out.token_id == winner
        assert out.logprobs[winner] == pytest.approx(float(logits.log_softmax(-1)[winner]), abs=1e-5)
    banned = SamplingParams(temperature=0.7, logit_bias={best: -100, rival: -100})
    assert {best, rival}.isdisjoint(draw(logits, banned, s) for s in range(100))


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
