"""Structured output (structured.py): a grammar constrains every draw of a request, through the engine's
loop, on both samplers, next to unconstrained requests in the same batch, and over the server."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch

from conftest import make_hf_model, write_byte_tokenizer
from megatier import LLM, MegatierError, SamplingParams, StructuredOutput
from megatier.sampling import Sampler, SampleRow
from megatier.structured import apply_token_masks
from serve_helpers import assert_refused, live_server, make_app

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}, "n": {"type": "integer"}},
    "required": ["ok", "size", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), "llama-mqa-untied")
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(str(tiny), max_model_len=256)


def constrained(constraint: StructuredOutput, **kw) -> SamplingParams:
    return SamplingParams(structured_output=constraint, **({"max_tokens": 200, "temperature": 1.0} | kw))


def test_a_constraint_takes_exactly_one_kind():
    with pytest.raises(MegatierError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(MegatierError, match="exactly one"):
        StructuredOutput(regex="a", json_object=True)
    with pytest.raises(MegatierError, match="choice"):
        StructuredOutput(choice=[])
    with pytest.raises(MegatierError, match="structured_output"):
        SamplingParams(structured_output={"regex": "a"})


def test_sampled_outputs_follow_a_regex_a_choice_and_a_schema(llm):
    """A random model sampled at T=1 emits noise; under each constraint every output is in the language,
    and the grammar ends it ("stop") rather than the length limit."""
    regex = llm.generate("id:", constrained(StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}"), n=4, seed=1))[0]
    for out in regex.outputs:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", out.text) and out.finish_reason == "stop", out.text
    choice = llm.generate("pick", constrained(StructuredOutput(choice=["red", "green", "blue"]), n=4, seed=2))[0]
    assert all(o.text in ("red", "green", "blue") and o.finish_reason == "stop" for o in choice.outputs)
    schema = llm.generate("json", constrained(StructuredOutput(json_schema=SCHEMA), n=3, seed=3, top_p=0.9))[0]
    for out in schema.outputs:
        value = json.loads(out.text)
        assert set(value) == {"ok", "size", "n"} and isinstance(value["ok"], bool) and value["size"] in "SML"
        assert isinstance(value["n"], int) and out.finish_reason == "stop"


def test_json_object_gives_an_object(llm):
    out = llm.generate("x", constrained(StructuredOutput(json_object=True), temperature=0, max_tokens=40))[0]
    assert out.text.lstrip().startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_unconstrained_rows_of_a_mixed_batch_are_unchanged(llm):
    """The constrained request's mask applies to its own row only, and taking its step before the next is
    scheduled changes nothing for the greedy request beside it."""
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate("hello there", plain)[0].token_ids
    both = llm.generate(["hello there", "digits:"], [plain, constrained(StructuredOutput(regex=r"[0-9]{8}"), seed=4)])
    assert both[0].token_ids == alone
    assert re.fullmatch(r"[0-9]{8}", both[1].text)


def test_a_bad_grammar_is_one_line_and_queues_nothing(llm):
    for constraint, words in [
        (StructuredOutput(json_schema={"type": "objectx"}), "objectx"),
        (StructuredOutput(json_schema="{not json"), "not JSON"),
        (StructuredOutput(regex="(unclosed"), "structured output"),
    ]:
        with pytest.raises(MegatierError, match=words) as e:
            llm.generate("x", constrained(constraint))
        assert "\n" not in str(e.value)
    assert not llm.engine.has_unfinished() and llm.engine.scheduler.num_pages_in_use == 0


def test_a_model_without_a_tokenizer_refuses_structured_output(tmp_path):
    path, _ = make_hf_model(tmp_path, "qwen2")
    with pytest.raises(MegatierError, match="tokenizer"):
        LLM(str(path), max_model_len=64).generate([[1, 2, 3]], constrained(StructuredOutput(regex="a")))


@pytest.mark.parametrize("fused", [False, True])
def test_masked_tokens_are_never_drawn_and_greedy_takes_the_best_allowed(fused):
    vocab, rows = 300, 6
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab) * 3
    allowed = torch.rand(rows, vocab) < 0.05
    allowed[:, 0] = True  # at least one token per row
    words = torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int64)
    for bit in range(32):
        chunk = torch.nn.functional.pad(allowed, (0, words.shape[1] * 32 - vocab)).view(rows, -1, 32)[:, :, bit]
        words |= chunk.long() << bit
    masks = words.to(torch.int32)  # the bit pattern as int32, as llguidance writes it
    assert torch.equal(apply_token_masks(logits, masks).isfinite(), allowed)
    device = torch.device("cuda" if fused and torch.cuda.is_available() else "cpu")  # else the interpreter
    sampler = Sampler(vocab, device, fused=fused, capture=False)
    greedy = [SampleRow(i, SamplingParams(temperature=0), 0, 0, []) for i in range(rows // 2)]
    sampled = [SampleRow(i, SamplingParams(temperature=1.5), i, 0, []) for i in range(rows // 2, rows)]
    raw = logits.clone()
    tokens = sampler.sample(logits.to(device), greedy + sampled, masks).tokens.cpu()
    assert allowed[torch.arange(rows), tokens].all()
    best = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
    assert torch.equal(tokens[: rows // 2], best[: rows // 2])
    assert torch.equal(logits, raw)  # the caller's logits (read for logprobs) are not masked in place


# -- the server --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny):
    with live_server(make_app(tiny)) as (url, _):
        yield url


def test_response_format_json_schema_over_the_openai_client(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], response_format=fmt, max_tokens=200, seed=5
    )
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"ok", "size", "n"} and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(
        model="tiny", prompt="a", max_tokens=20, stream=True, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert "".join(c.choices[0].text for c in chunks) in ("yes", "no")
    regex = httpx.post(f"{server}/v1/completions", json={"prompt": "a", "max_tokens": 20, "guided_regex": "[ab]{5}"})
    assert re.fullmatch("[ab]{5}", regex.json()["choices"][0]["text"])


CHAT = {"messages": [{"role": "user", "content": "hi"}]}

REFUSED = {
    "unknown type": (CHAT | {"response_format": {"type": "yaml"}}, "response_format"),
    "json_schema without a schema": (
        CHAT | {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        None,
    ),
    "a schema that does not compile": (
        CHAT | {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}},
        "response_format",
    ),
    "a bad regex": (CHAT | {"guided_regex": "(unclosed"}, "guided_regex"),
    "two constraints": (CHAT | {"guided_regex": "a", "response_format": {"type": "json_object"}}, None),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_structured_output_requests_get_a_400(server, case):
    assert_refused(server, "/v1/chat/completions", *REFUSED[case])
