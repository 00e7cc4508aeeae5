"""The OpenAI-compatible server on loopback: the official openai client, every error case, disconnects,
64 concurrent streams, the queue limit, /metrics and graceful shutdown. A tiny random model with a
byte-level tokenizer keeps each request to milliseconds."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import make_hf_model, write_byte_tokenizer
from megatier import LLM, SamplingParams, __version__
from megatier.bench.common import device_name
from megatier.serve import app as app_module
from megatier.serve.app import create_app, server_info
from serve_helpers import MAX_MODEL_LEN, live_server, make_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), "llama-mqa-untied")
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same model in-process: what the server must reproduce."""
    return LLM(str(model_dir), max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(model_dir):
    app = make_app(model_dir, api_key=KEY)
    with live_server(app) as (url, _):
        yield url, app


@pytest.fixture
def url(server):
    return server[0]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def sse_events(response: httpx.Response) -> list:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


# -- the openai client ---------------------------------------------------------------------------------------


def test_completion_matches_the_engine(client, reference):
    out = client.completions.create(
        model="tiny", prompt="hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = reference.generate("hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_completion_stream_equals_the_whole_response_and_ends_with_usage(client):
    args = dict(
        model="tiny", prompt="stream me", max_tokens=10, temperature=1.0, seed=5, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_streaming_and_not(client, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    expected = reference.chat(messages, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))[0].text
    extra = {"ignore_eos": True}
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0, extra_body=extra)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.completion_tokens == 9
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_completion_tokens=9, temperature=0, stream=True, extra_body=extra
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_cuts_the_text(client):
    args = dict(model="tiny", prompt="abc", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**args).choices[0].text
    stop = full[10:12]
    out = client.completions.create(**args, stop=[stop]).choices[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop"
    streamed = list(client.completions.create(**args, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == out.text


def test_n_choices_are_seeded_independently(client):
    args = dict(model="tiny", prompt="seeds", max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
    three = client.completions.create(**args, n=3, seed=7)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 36
    # Sequence i of a request with seed s samples like a lone request with seed s + i.
    second = client.completions.create(**args, seed=8)
    assert three.choices[1].text == second.choices[0].text
    assert len({c.text for c in three.choices}) > 1
    streamed = list(client.completions.create(**args, n=3, seed=7, stream=True))
    for i in range(3):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == three.choices[i].text


def test_completion_logprobs(client):
    out = client.completions.create(
        model="tiny", prompt="lp", max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and chosen <= 0
        # Greedy picks the most likely token. (Byte tokens that decode alike share one key, so compare values.)
        assert chosen >= max(top.values()) - 1e-6


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_token_id_prompts_and_batches(client, reference):
    out = client.completions.create(
        model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert [c.text for c in out.choices] == [r.text for r in reference.generate([[5, 6, 7], [8, 9]], params)]
    assert out.usage.prompt_tokens == 5


def test_models_health_tokenize_detokenize(url, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(f"{url}/health").status_code == 200  # open without the key, for probes
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}, headers=AUTH).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}, headers=AUTH).json()["prompt"]
    assert text == "hi"
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=AUTH).json()
    assert chat["count"] > tokens["count"]


def test_info_names_what_the_server_runs(url, server, monkeypatch):
    """GET /v1/megatier/info: the device, backend, commit and batch limits a load client records."""
    assert httpx.get(f"{url}/v1/megatier/info").status_code == 401  # behind the key, like /v1/models
    info = httpx.get(f"{url}/v1/megatier/info", headers=AUTH).json()
    llm = server[1].state.megatier.llm
    assert info["device"] == device_name(torch.device("cpu")) and info["device_type"] == "cpu"
    assert info["backend"] == llm.backend and info["model"] == "tiny" and info["dtype"] == "float32"
    assert info["max_num_seqs"] == 256 and info["max_model_len"] == MAX_MODEL_LEN and info["quant_kinds"] == []
    assert info["quantization"] == "auto" and info["load_format"] == "auto" and info["version"] == __version__
    monkeypatch.setenv("MEGATIER_COMMIT", "abc1234")
    fp8 = LLM(llm.model_path, quantization="fp8", max_model_len=64, max_num_seqs=4)
    described = server_info(fp8, "tiny")
    assert described["commit"] == "abc1234" and described["quantization"] == "fp8"
    assert described["quant_kinds"] == ["FP8"] and described["max_num_seqs"] == 4
    monkeypatch.setattr(app_module, "git_commit", lambda: None)  # no $MEGATIER_COMMIT, no git: the version
    assert server_info(fp8, "tiny")["commit"] == __version__


# -- errors --------------------------------------------------------------------------------------------------

LONG_PROMPT = list(range(3, 3 + MAX_MODEL_LEN))
CHAT = {"messages": [{"role": "user", "content": "hi"}]}

ERROR_CASES = {
    "malformed json": ("/v1/completions", b'{"prompt": "a",', 400, None, "not valid JSON"),
    "body not an object": ("/v1/completions", [1, 2], 400, None, "JSON object"),
    "missing prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    "prompt of the wrong type": ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt", "list of token ids"),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "model", "does not exist"),
    "negative temperature": ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, None, "temperature"),
    "temperature not a number": (
        "/v1/completions",
        {"prompt": "a", "temperature": "hot"},
        400,
        "temperature",
        "number",
    ),
    "n zero": ("/v1/completions", {"prompt": "a", "n": 0}, 400, None, "n must be"),
    "top_p above one": ("/v1/completions", {"prompt": "a", "top_p": 2}, 400, None, "top_p"),
    "max_tokens zero": ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, None, "max_tokens"),
    "too many logprobs": ("/v1/completions", {"prompt": "a", "logprobs": 30}, 400, None, "logprobs"),
    "empty prompt": ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    "token id outside the vocabulary": ("/v1/completions", {"prompt": [1, 100000]}, 400, "prompt", "vocabulary"),
    "prompt longer than max-model-len": ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "prompt", "context length"),
    "chat prompt too long": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}]},
        400,
        "messages",
        "context length",
    ),
    "no messages": ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    "message without role": (
        "/v1/chat/completions",
        {"messages": [{"content": "x"}]},
        400,
        "messages.0.role",
        "required",
    ),
    "image content": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages",
        "only text",
    ),
    "top_logprobs without logprobs": (
        "/v1/chat/completions",
        CHAT | {"top_logprobs": 2},
        400,
        "top_logprobs",
        "logprobs=true",
    ),
    "detokenize out of range": ("/detokenize", {"tokens": [1, 99999]}, 400, "tokens", "vocabulary"),
    "unknown route": ("/v1/embeddings", {"input": "a"}, 404, None, "Not Found"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_requests_get_openai_errors(url, server, case):
    path, body, status, param, words = ERROR_CASES[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}{path}", content=content, headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and "\n" not in error["message"]
    assert error["param"] == param
    engine = server[1].state.megatier.engine
    assert engine.num_pending == 0 and engine.engine.scheduler.num_pages_in_use == 0  # nothing half-admitted


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_api_key_is_refused(url, headers):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{url}/v1/completions", content=b"{", headers=headers).status_code == 401  # before parsing
    assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{url}/metrics", headers=headers).status_code == 200


def test_the_server_keeps_serving_after_errors(client):
    for _ in range(2):
        httpx.post(f"{client.base_url}completions", content=b"{", headers=AUTH)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="a", temperature=-1)
    out = client.completions.create(model="tiny", prompt="still here", max_tokens=3, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3


def test_model_without_tokenizer_takes_token_ids_only(tmp_path):
    path, _ = make_hf_model(tmp_path, "qwen2")
    with live_server(make_app(path)) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "text"})
        assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_an_engine_failure_fails_the_requests_in_flight_and_the_server_recovers(model_dir):
    app = make_app(model_dir)
    executor = app.state.megatier.llm.engine.executor
    forward, broken = executor.forward, [True]

    def failing_forward(batch):
        if broken[0]:
            raise RuntimeError("simulated device fault")
        return forward(batch)

    executor.forward = failing_forward
    with live_server(app) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 4})
        assert r.status_code == 500 and "simulated device fault" in r.json()["error"]["message"]
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "b", "stream": True}) as s:
            events = sse_events(s)
        assert "simulated device fault" in json.loads(events[0])["error"]["message"] and events[-1] == "[DONE]"
        assert pages_in_use(app) == 0
        broken[0] = False
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "c", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# -- disconnects, concurrency, limits -----------------------------------------------------------------------


def pages_in_use(app) -> int:
    return app.state.megatier.engine.engine.scheduler.num_pages_in_use


class SlowSteps:
    """Wraps the executor so each engine step takes at least `seconds` and is counted: a request of
    hundreds of tokens then lasts seconds, and a cancelled one visibly stops taking steps."""

    def __init__(self, app, seconds: float):
        self.count = 0
        executor = app.state.megatier.llm.engine.executor
        forward = executor.forward

        def slow_forward(batch):
            self.count += 1
            time.sleep(seconds)
            return forward(batch)

        executor.forward = slow_forward


@pytest.fixture(scope="module")
def slow_server(model_dir):
    app = make_app(model_dir)
    steps = SlowSteps(app, 0.01)
    with live_server(app) as (url, _):
        yield url, app, steps


def assert_cancelled(app, steps: SlowSteps) -> None:
    """The request's pages come back long before its 240 tokens could have been generated, and the
    engine stops stepping it."""
    engine = app.state.megatier.engine
    wait_for(lambda: pages_in_use(app) == 0 and engine.num_pending == 0, timeout=5)
    taken = steps.count
    time.sleep(0.2)
    assert steps.count == taken and taken < 200
    assert engine.engine.num_running == 0 and not engine.engine.has_unfinished()


def test_disconnect_mid_stream_frees_the_pages(slow_server):
    url, app, steps = slow_server
    steps.count = 0
    body = {"prompt": "a long one", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        chunks = [next(lines) for _ in range(6)]  # a few chunks (and blank separators): it is running
        assert chunks[0].startswith("data: ")
        assert metric(url, "megatier:kv_pages_in_use") > 0
    assert_cancelled(app, steps)


def test_disconnect_while_waiting_for_a_whole_response_frees_the_pages(slow_server):
    url, app, steps = slow_server
    steps.count = 0
    body = {"prompt": "slow", "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    assert steps.count > 0
    assert_cancelled(app, steps)


def test_a_long_prompt_joins_in_chunks_while_a_stream_keeps_its_pace(model_dir):
    """With 32 tokens per step, a 200-token prompt is prefilled over 7 steps; the running stream gets a
    token in each of them instead of stalling for one long prefill."""
    app = make_app(model_dir, max_num_batched_tokens=32)
    SlowSteps(app, 0.01)
    arrivals: list[float] = []
    with live_server(app) as (url, _):
        body = {"prompt": "runner", "max_tokens": 150, "ignore_eos": True, "stream": True}

        def run_stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.monotonic())

        reader = threading.Thread(target=run_stream)
        reader.start()
        wait_for(lambda: len(arrivals) >= 3)  # the stream is decoding
        sent = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": list(range(3, 203)), "max_tokens": 1})
        done = time.monotonic()
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 200
        reader.join(timeout=30)
    assert len(arrivals) == 150  # one chunk per token
    assert sum(sent < t < done for t in arrivals) >= 6


def test_64_concurrent_streams_match_lone_requests(url, reference):
    prompts = [f"prompt number {i} " + "x" * (i % 7) for i in range(64)]

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.completions.create(
            model="tiny",
            prompt=prompts[i],
            max_tokens=8,
            temperature=1.0,
            seed=1000 + i,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    texts = asyncio.run(all_of_them())
    assert len(set(texts)) > 32  # independent outputs, not one stream copied
    for i in range(64):
        params = SamplingParams(temperature=1.0, max_tokens=8, seed=1000 + i, ignore_eos=True)
        assert texts[i] == reference.generate(prompts[i], params)[0].text, f"stream {i}"


def test_full_queue_answers_503_and_recovers(model_dir):
    app = make_app(model_dir, max_num_seqs=1, max_queue_len=1)
    SlowSteps(app, 0.01)  # the two held streams last seconds
    body = {"prompt": "hold", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with live_server(app) as (url, _):
        with (
            httpx.stream("POST", f"{url}/v1/completions", json=body) as first,
            httpx.stream("POST", f"{url}/v1/completions", json=body) as second,
        ):
            assert first.status_code == second.status_code == 200
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "one more"})
            assert r.status_code == 503
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "server_overloaded"
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "two", "n": 2})
            assert r.status_code == 503
        wait_for(lambda: app.state.megatier.engine.num_pending == 0)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "room again", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200
        assert metric(url, "megatier:requests_rejected_total") == 2


def test_metrics_expose_the_named_series(server, client):
    url, app = server
    client.completions.create(model="tiny", prompt="m", max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "megatier:time_to_first_token_seconds_bucket",
        "megatier:inter_token_latency_seconds_bucket",
        "megatier:e2e_request_latency_seconds_bucket",
        "megatier:num_requests_running",
        "megatier:num_requests_waiting",
        "megatier:kv_pages_in_use",
        "megatier:kv_pages_total",
        "megatier:prompt_tokens_total",
        "megatier:generation_tokens_total",
    ):
        assert name in text, name
    assert metric(url, "megatier:time_to_first_token_seconds_count") >= 1
    assert metric(url, "megatier:inter_token_latency_seconds_count") >= 3
    assert metric(url, "megatier:kv_pages_total") == app.state.megatier.llm.stats.kv_pages


# -- shutdown ------------------------------------------------------------------------------------------------


def test_shutdown_lets_short_streams_finish(model_dir):
    app = make_app(model_dir)
    with live_server(app, shutdown_timeout=30) as (url, server):
        body = {"prompt": "finish me", "max_tokens": 20, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            server.should_exit = True
            events = [line for line in lines if line.startswith("data: ")]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == "data: [DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_shutdown_ends_long_streams_with_abort(model_dir):
    app = make_app(model_dir)
    SlowSteps(app, 0.01)
    with live_server(app, shutdown_timeout=0) as (url, server):
        body = {"prompt": "never ends", "max_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            server.should_exit = True
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
        wait_for(lambda: pages_in_use(app) == 0)


def test_server_with_tiered_kv_streams_past_hbm(model_dir, reference):
    """--kv-hbm/--kv-dram on loopback: a prompt whose KV is several times the HBM budget streams back the
    in-process all-HBM tokens, and /metrics shows the pages per tier and the hit rate."""
    page_gib = reference.config.kv_bytes_per_token(torch.float32) * 16 / 2**30
    llm = LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, kv_hbm=6 * page_gib, kv_dram=16 * page_gib)
    app = create_app(llm, served_model_name="tiny")
    prompt = "the tiered cache " * 12  # 204 bytes: 13 pages of 16 tokens, the HBM holds 6
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = reference.generate(prompt, params)[0].text
    with live_server(app) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        assert "".join(chunk.choices[0].text for chunk in stream) == want
        text = httpx.get(f"{url}/metrics").text
        dram = float(re.search(r'^megatier:kv_tier_pages\{tier="dram"\} (\S+)$', text, re.M).group(1))
        assert dram == 0  # the request finished: its pages are free again
        assert 0 < metric(url, "megatier:kv_hbm_hit_rate") < 1  # decode steps read DRAM slices
