"""`megatier bench serve` against a live server on loopback (the record names the server's device, backend
and commit; warm-ups, goodput, ShareGPT files, per-request arrays), its metric arithmetic, and `megatier
serve` as a newcomer runs it (a subprocess, stopped with Ctrl-C)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from conftest import make_hf_model, write_byte_tokenizer
from megatier.bench.common import device_name
from megatier.bench.serve import Result, describe_server, make_requests, server_info, summarize
from megatier.cli import build_parser, main
from serve_helpers import live_server, make_app

SERVER_COMMIT = "0123abc-server"  # $MEGATIER_COMMIT as the server saw it at start, not the client


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), "llama-llama3rope-tied-bias")
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGATIER_COMMIT", SERVER_COMMIT)
        app = make_app(model_dir)
    with live_server(app) as (base_url, _):
        yield base_url, app


@pytest.fixture
def url(server):
    return server[0]


def bench(url: str, *extra: str) -> list[str]:
    return ["bench", "serve", "--base-url", url, "--num-prompts", "12", "--ignore-eos", *extra]


def generated_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^megatier:generation_tokens_total (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("processes", [1, 2])
def test_random_completions_report_and_record(server, tmp_path, capsys, processes):
    """The same load and the same record from one client process or from two sharing it."""
    url, app = server
    out = tmp_path / "serve.json"
    args = bench(url, "--random-input-len", "16", "--random-output-len", "8", "--max-concurrency", "4")
    args += ["--client-processes", str(processes)]
    args += ["--num-warmups", "3", "--goodput", "ttft:60000", "e2el:60000"]
    backend = app.state.megatier.llm.backend
    before = generated_tokens(url)
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"server: {device_name(torch.device('cpu'))}, backend {backend}, commit {SERVER_COMMIT}" in printed
    assert "============ Serving Benchmark Result ============" in printed
    for label in ("Successful requests:", "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):", "P90 E2EL (ms):"):
        assert label in printed
    assert "Request goodput (req/s):" in printed
    assert generated_tokens(url) - before == (3 + 12) * 8  # the warm-ups ran, in full, and were not counted
    rec = json.loads(out.read_text())
    assert rec["bench"] == "serve" and rec["config"]["model"] == "tiny" and rec["config"]["num_warmups"] == 3
    assert rec["config"]["client_processes"] == processes
    r = rec["results"]
    assert r["completed"] == 12 and r["failed"] == 0
    assert r["total_input_tokens"] == 12 * 16  # token-id prompts: exact lengths
    assert r["total_output_tokens"] == 12 * 8  # ignore_eos: exactly max_tokens
    assert 0 < r["median_ttft_ms"] <= r["median_e2el_ms"]
    assert r["mean_tpot_ms"] > 0 and r["p99_itl_ms"] >= r["median_itl_ms"]
    assert r["request_throughput"] == pytest.approx(12 / r["duration_s"])
    assert r["request_goodput"] == pytest.approx(r["request_throughput"]) and r["goodput_fraction"] == 1
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # The server's identity, as it reported it; the client's own beside it.
    info = app.state.megatier.info
    assert (rec["device"], rec["backend"], rec["commit"]) == (info["device"], backend, SERVER_COMMIT)
    assert rec["server"] == info and rec["server"]["max_num_seqs"] == 256 and rec["server"]["dtype"] == "float32"
    assert rec["client"]["commit"] != SERVER_COMMIT and rec["client"]["torch"] == torch.__version__

    # Per-request arrays, in request order: they add up to the summary, and the texts are what was generated.
    per = rec["per_request"]
    assert per["input_lens"] == [16] * 12 and per["output_lens"] == [8] * 12 and per["errors"] == [""] * 12
    assert per["slo_met"] == [True] * 12
    assert 1e3 * statistics.median(per["ttfts"]) == pytest.approx(r["median_ttft_ms"])
    assert 1e3 * statistics.mean(per["e2els"]) == pytest.approx(r["mean_e2el_ms"])
    assert sum(len(gaps) for gaps in per["itls"]) > 0
    prompts = make_requests(build_parser().parse_args([*args, "--dataset", "random"]))
    for i in (0, 11):
        body = {"prompt": prompts[i].prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        assert httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"] == per["generated_texts"][i]


def test_sharegpt_lengths_through_chat_with_a_tokenizer(url, model_dir, tmp_path):
    out = tmp_path / "chat.json"
    args = bench(url, "--endpoint", "/v1/chat/completions", "--dataset", "sharegpt", "--tokenizer", str(model_dir))
    args += ["--random-input-len", "20", "--random-output-len", "6", "--request-rate", "200", "--json", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())["results"]
    assert r["completed"] == 12
    assert r["total_input_tokens"] > 12 * 20 // 4  # the server's count, chat template included


def test_bad_targets_fail_with_one_line(url, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert main(bench(f"http://127.0.0.1:{closed_port}")) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(bench(url, "--model", "nope")) == 2
    err = capsys.readouterr().err
    assert "warm-up request" in err and "404" in err
    assert main(bench(url, "--endpoint", "/v1/chat/completions")) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_goodput_counts_only_requests_meeting_every_slo():
    slos = {"ttft": 0.2, "tpot": 0.15, "e2el": 0.6}
    results = [
        Result(ok=True, output_tokens=5, ttft=0.1, e2el=0.5),  # meets all: TPOT 0.1
        Result(ok=True, output_tokens=5, ttft=0.3, e2el=0.5),  # TTFT too long
        Result(ok=True, output_tokens=3, ttft=0.1, e2el=0.5),  # TPOT 0.2 too long
        Result(ok=True, output_tokens=11, ttft=0.1, e2el=0.8),  # TPOT 0.07, but E2EL too long
        Result(ok=True, output_tokens=1, ttft=0.15, e2el=0.15),  # one token: TPOT 0, meets all
        Result(ok=False, ttft=0.0, e2el=0.0, error="HTTP 500"),  # failed: meets nothing, however fast
    ]
    summary, _ = summarize(results, duration=2.0, percentiles=[50], slos=slos)
    assert summary["request_goodput"] == pytest.approx(1.0)  # 2 good requests in 2 s
    assert summary["goodput_fraction"] == pytest.approx(2 / 6)
    assert summary["request_throughput"] == pytest.approx(2.5)
    assert "request_goodput" not in summarize(results, 2.0, [50])[0]


@pytest.mark.parametrize(
    "spec, message",
    [
        (["ttft"], "--goodput 'ttft': expected KEY:MS"),
        (["ttfb:500"], "--goodput 'ttfb:500': expected KEY:MS with KEY one of ttft, tpot, e2el"),
        (["tpot:fast"], "--goodput 'tpot:fast'"),
        (["e2el:-1"], "--goodput 'e2el:-1'"),
        (["ttft:500", "ttft:400"], "--goodput names ttft twice"),
    ],
)
def test_bad_goodput_fails_with_one_line(spec, message, capsys):
    assert main([*bench("http://127.0.0.1:9"), "--goodput", *spec]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def sharegpt_entry(*turns: tuple[str, str]) -> dict:
    return {"id": "x", "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_sharegpt_file_lengths_and_filters(url, model_dir, tmp_path):
    """The byte tokenizer counts one token per ASCII character, so every length here is known."""
    entries = [
        sharegpt_entry(("human", "a" * 20), ("gpt", "b" * 6)),  # used: 20 in, 6 out
        sharegpt_entry(("system", "ignored"), ("human", "c" * 30), ("gpt", "d" * 9), ("human", "more")),  # 30, 9
        sharegpt_entry(("gpt", "e" * 40), ("human", "f" * 12), ("gpt", "g" * 5)),  # first human turn: 12, 5
        sharegpt_entry(("human", "hi"), ("gpt", "h" * 10)),  # prompt under 4 tokens
        sharegpt_entry(("human", "i" * 10), ("gpt", "ok")),  # reply under 4 tokens (unless --output-len)
        sharegpt_entry(("human", "j" * 1100), ("gpt", "k" * 10)),  # prompt over 1024
        sharegpt_entry(("human", "l" * 1000), ("gpt", "m" * 1100)),  # over 2048 in all
        sharegpt_entry(("human", "n" * 10)),  # no reply
        sharegpt_entry(),
    ]
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(entries))
    out = tmp_path / "sharegpt_out.json"
    args = bench(url, "--dataset-path", str(data), "--tokenizer", str(model_dir), "--json", str(out))
    assert main([*args, "--num-prompts", "3"]) == 0
    rec = json.loads(out.read_text())
    assert rec["config"]["dataset"] == "sharegpt" and rec["config"]["dataset_path"] == str(data)
    per = rec["per_request"]
    assert sorted(per["output_lens"]) == [5, 6, 9]  # each reply's length, exactly (ignore_eos)
    assert sorted(per["input_lens"]) == [12 + 1, 20 + 1, 30 + 1]  # the server's count adds <s>

    # A fixed --output-len skips the reply's checks: the short reply qualifies (as would the 1000 + 1100
    # one, whose 1001-token prompt this server's 256-token context cannot take: leave it out).
    data.write_text(json.dumps(entries[:6] + entries[7:]))
    assert main([*args, "--num-prompts", "4", "--output-len", "7"]) == 0
    per = json.loads(out.read_text())["per_request"]
    assert per["output_lens"] == [7] * 4 and sorted(per["input_lens"]) == [11, 13, 21, 31]


def test_sharegpt_sampling_is_seeded(model_dir, tmp_path):
    data = tmp_path / "many.json"
    data.write_text(json.dumps([sharegpt_entry(("human", "p" * (5 + i)), ("gpt", "r" * 8)) for i in range(40)]))

    def prompts(seed: int) -> list[int]:
        cli = ["bench", "serve", "--dataset-path", str(data), "--tokenizer", str(model_dir), "--num-prompts", "10"]
        args = build_parser().parse_args([*cli, "--seed", str(seed)])
        return [r.prompt_len for r in make_requests(args)]

    assert prompts(0) == prompts(0) and prompts(0) != prompts(1)
    assert len(set(prompts(0))) == 10


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("[{", "not valid JSON"),
        ('{"conversations": []}', "expected a JSON list of conversations, got a JSON dict"),
        ('[{"conversations": [{"from": "human"}]}]', "entry 0 is not"),
        ('[{"id": 1}]', "entry 0 is not"),
        ('[{"conversations": [{"from": "gpt", "value": "x"}]}]', "no conversation has a human turn"),
        (
            '[{"conversations": [{"from": "human", "value": "a few words"}, {"from": "gpt", "value": "x"}]}]',
            "only 0 of",
        ),
    ],
)
def test_bad_dataset_files_fail_with_one_line(content, message, model_dir, tmp_path, capsys):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    args = [*bench("http://127.0.0.1:9"), "--dataset-path", str(path), "--tokenizer", str(model_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--dataset-path {path}: " in err and message in err and err.count("\n") == 1


def test_dataset_path_needs_a_tokenizer_and_no_random(tmp_path, capsys):
    assert main([*bench("http://127.0.0.1:9"), "--dataset-path", str(tmp_path / "x.json")]) == 2
    assert "--dataset-path needs --tokenizer" in capsys.readouterr().err
    assert main([*bench("http://127.0.0.1:9"), "--dataset-path", "x.json", "--dataset", "random"]) == 2
    assert "drop --dataset random" in capsys.readouterr().err


def test_other_servers_are_recorded_as_unknown():
    """A server without /v1/megatier/info (vLLM, say) leaves the server fields empty rather than guessed."""

    class NotFound:
        status = 404

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def read(self) -> bytes:
            return b'{"detail": "Not Found"}'

    class OtherServer:  # what bench serve's aiohttp session does with a server that lacks the route
        def get(self, path: str) -> NotFound:
            assert path == "/v1/megatier/info"
            return NotFound()

    async def ask() -> dict | None:
        return await server_info(OtherServer())

    assert asyncio.run(ask()) is None
    assert "not megatier" in describe_server(None)


def test_summary_follows_vllm_definitions():
    results = [
        Result(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, e2el=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
        Result(ok=True, prompt_tokens=20, output_tokens=3, ttft=0.3, e2el=0.7, itl=[0.2, 0.2]),
        Result(ok=False, error="HTTP 503"),
    ]
    summary, samples = summarize(results, duration=2.0, percentiles=[50, 99])
    assert summary["completed"] == 2 and summary["failed"] == 1 and summary["first_error"] == "HTTP 503"
    assert samples["tpot"] == pytest.approx([0.1, 0.2])  # (e2el - ttft) / (output - 1)
    assert len(samples["itl"]) == 6  # every gap, pooled over requests
    assert summary["mean_ttft_ms"] == pytest.approx(200)
    assert summary["median_itl_ms"] == pytest.approx(100)
    assert summary["output_throughput"] == pytest.approx(4.0)
    assert summary["total_token_throughput"] == pytest.approx(19.0)


def test_megatier_serve_command(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "megatier", "serve", "--model", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--api-key", "k", "--served-model-name", "tiny"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "megatier serve did not come up"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.choices[0].message.role == "assistant"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130  # shut down cleanly, exit status of Ctrl-C
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
