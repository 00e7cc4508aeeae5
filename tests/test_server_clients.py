"""What real clients of the OpenAI-compatible server send (lm-eval, langchain-openai, litellm, guidellm),
on loopback: echo with prompt logprobs (lm-eval's loglikelihood requests), vLLM's prompt_logprobs,
logit_bias, GET /v1/models/{id}, continuous usage in streams, and a clear 400 for what the server cannot
do (legacy functions, suffix, best_of). The server's token budget is small, so prompts are prefilled in chunks."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from conftest import make_hf_model, write_byte_tokenizer
from serve_helpers import live_server, make_app

BUDGET = 16  # tokens per engine step: the prompts below take several prefill steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, the same model in transformers: the oracle for prompt logprobs)."""
    path, model = make_hf_model(tmp_path_factory.mktemp("tiny"), "llama-mqa-untied")
    write_byte_tokenizer(path)
    return path, model


@pytest.fixture(scope="module")
def server(tiny):
    app = make_app(tiny[0], max_num_batched_tokens=BUDGET)
    with live_server(app) as (url, _):
        yield url, app


@pytest.fixture
def url(server):
    return server[0]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def encode(text: str) -> list[int]:
    """The byte tokenizer of the fixture: BOS, then one token per byte."""
    return [256, *text.encode()]


def oracle_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[p] | ids[:p]) for p >= 1, from one full-sequence forward of transformers."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


PROMPT = "the quick brown fox jumps over the lazy dog"  # 44 tokens with BOS: 3 prefill steps


# -- echo and prompt logprobs ------------------------------------------------------------------------------


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(client, tiny):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    choice, ids = out.choices[0], encode(PROMPT)
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 3
    assert lp.tokens[0] == "<s>" and "".join(lp.tokens[1 : len(ids)]) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = oracle_logprobs(tiny[1], ids)
    assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), want, atol=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # The generated part is what a request without echo gets.
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    assert choice.text == PROMPT + plain.choices[0].text
    assert lp.token_logprobs[len(ids) :] == pytest.approx(plain.choices[0].logprobs.token_logprobs)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 3


def test_lm_eval_loglikelihood_request(url, tiny):
    """lm-eval's local-completions loglikelihood: token id prompts in a batch, echo, max_tokens 1,
    logprobs 1; it sums token_logprobs[ctxlen:-1] and checks greedy-ness against top_logprobs."""
    context, continuation = encode("Question: 2+2? Answer:"), list(b" four")
    batch = [context + continuation, context + list(b" five")]
    body = {"model": "tiny", "prompt": batch, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1}
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    for choice, ids in zip(choices, batch, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1
        score = sum(lp["token_logprobs"][len(context) : -1])
        assert score == pytest.approx(float(oracle_logprobs(tiny[1], ids)[len(context) - 1 :].sum()), abs=1e-3)
        for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert len(top) == 1 and value <= max(top.values()) + 1e-6


def test_echo_with_max_tokens_zero_returns_only_the_scored_prompt(client, tiny):
    ids = encode(PROMPT)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=0, logprobs=0, echo=True)
    choice = out.choices[0]
    assert choice.text == PROMPT  # token id prompts are echoed decoded
    assert choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs[1:]), oracle_logprobs(tiny[1], ids), atol=1e-4)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    streamed = list(client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == PROMPT


def test_echo_streams_the_prompt_first(client):
    args = dict(model="tiny", prompt=["abc", "xyz"], max_tokens=5, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**args, n=2)
    chunks = list(client.completions.create(**args, n=2, stream=True))
    for i, choice in enumerate(whole.choices):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].text.startswith(["abc", "xyz"][i // 2])
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine for t in c.logprobs.token_logprobs] == choice.logprobs.token_logprobs
        assert [o for c in mine for o in c.logprobs.text_offset] == choice.logprobs.text_offset


def test_vllm_prompt_logprobs_field(client, tiny):
    ids = encode(PROMPT)
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 3}
    )
    choice = out.model_dump()["choices"][0]
    assert choice["logprobs"] is None and choice["text"] and not choice["text"].startswith(PROMPT)
    scored = choice["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    want = oracle_logprobs(tiny[1], ids)
    for p, entries in enumerate(scored[1:], 1):
        token = str(ids[p])
        assert token == next(iter(entries))  # the prompt token first, then the top 3
        assert entries[token]["logprob"] == pytest.approx(float(want[p - 1]), abs=1e-4)
        assert entries[token]["decoded_token"] == bytes([ids[p]]).decode()
        top = sorted((e for t, e in entries.items() if t != token), key=lambda e: -e["logprob"])
        assert 2 <= len(top) <= 3 and [e["rank"] for e in top] == sorted(e["rank"] for e in top)
        better = sum(e["logprob"] > entries[token]["logprob"] for e in entries.values())
        assert entries[token]["rank"] == better + 1 or entries[token]["rank"] > 3


# -- logit_bias --------------------------------------------------------------------------------------------


def test_logit_bias_steers_completions_and_chat(client):
    forced = ord("q")
    args = dict(
        model="tiny", max_tokens=6, temperature=0, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True}
    )
    assert client.completions.create(prompt="hello", **args).choices[0].text == "q" * 6
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **args)
    assert chat.choices[0].message.content == "q" * 6
    plain = client.completions.create(model="tiny", prompt="hello", max_tokens=1, temperature=0, logprobs=0)
    first = plain.choices[0].logprobs.tokens[0].encode()
    if len(first) == 1:  # a byte token: ban it, and greedy picks another
        banned = client.completions.create(
            model="tiny", prompt="hello", max_tokens=1, temperature=0, logit_bias={str(first[0]): -100}
        )
        assert banned.choices[0].text != plain.choices[0].text


# -- models and usage --------------------------------------------------------------------------------------


def test_retrieve_a_model_by_id(client, url):
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    r = httpx.get(f"{url}/v1/models/org/gpt-9")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and "gpt-9" in r.json()["error"]["message"]


def test_continuous_usage_stats_on_every_chunk(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    args = dict(model="tiny", max_tokens=5, temperature=0, stream=True, stream_options=options)
    extra = {"ignore_eos": True}
    chunks = list(client.completions.create(prompt="count", **args, extra_body=extra))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == list(range(1, 6)) and {c.usage.prompt_tokens for c in chunks} == {len(encode("count"))}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    chat = list(client.chat.completions.create(messages=[{"role": "user", "content": "x"}], **args, extra_body=extra))
    assert all(c.usage is not None for c in chat)
    assert chat[0].usage.completion_tokens == 0 and chat[-2].usage.completion_tokens == 5


# -- what the server refuses -------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

REFUSED = {
    "tool_choice required": ("/v1/chat/completions", CHAT | {"tool_choice": "required"}, "tool_choice"),
    "functions": ("/v1/chat/completions", CHAT | {"functions": [TOOL["function"]]}, "functions"),
    "suffix": ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
    "best_of": ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),
    "logit_bias above 100": ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}, None),
    "logit_bias token outside the vocabulary": (
        "/v1/chat/completions",
        CHAT | {"logit_bias": {"100000": 1}},
        "logit_bias",
    ),
    "logit_bias key not a token id": ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    "too many prompt_logprobs": ("/v1/completions", {"prompt": "a", "prompt_logprobs": 21}, None),
    "max_tokens zero without echo": ("/v1/completions", {"prompt": "a", "max_tokens": 0}, None),
}

FIELD_WORDS = {"logit_bias above 100": "logit_bias", "too many prompt_logprobs": "prompt_logprobs"}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_or_bad_fields_get_a_400_naming_them(url, server, case):
    path, body, param = REFUSED[case]
    r = httpx.post(f"{url}{path}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]
    assert FIELD_WORDS.get(case, param or "max_tokens") in error["message"]
    engine = server[1].state.megatier.engine
    assert engine.num_pending == 0 and engine.engine.scheduler.num_pages_in_use == 0  # nothing half-admitted


def test_what_clients_send_by_default_is_accepted(client):
    """tool_choice none with tools, response_format text, logprobs false: nothing to refuse; the server
    keeps serving after the refusals above."""
    body = CHAT | {"tools": [TOOL], "tool_choice": "none", "response_format": {"type": "text"}, "max_tokens": 2}
    out = client.chat.completions.create(model="tiny", **body)
    assert out.choices[0].message.content is not None and out.usage.completion_tokens >= 1


def test_echo_needs_a_tokenizer(tmp_path):
    path, _ = make_hf_model(tmp_path, "qwen2")
    app = make_app(path)
    with live_server(app) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "echo": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        body = {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 0}
        scored = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
        assert scored[0] is None and list(scored[1]) == ["2"]
        assert json.dumps(scored[2]["3"]["decoded_token"]) == '"token_id:3"'
        assert app.state.megatier.engine.num_pending == 0
