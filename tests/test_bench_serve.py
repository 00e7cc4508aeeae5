"""`megatier bench serve` against a live server on loopback, its metric arithmetic, and `megatier serve` as a
newcomer runs it (a subprocess, stopped with Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import make_hf_model, write_byte_tokenizer
from megatier.bench.serve import Result, summarize
from megatier.cli import main
from serve_helpers import live_server, make_app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), "llama-llama3rope-tied-bias")
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def url(model_dir):
    with live_server(make_app(model_dir)) as (base_url, _):
        yield base_url


def bench(url: str, *extra: str) -> list[str]:
    return ["bench", "serve", "--base-url", url, "--num-prompts", "12", "--ignore-eos", *extra]


def test_random_completions_report_and_record(url, tmp_path, capsys):
    out = tmp_path / "serve.json"
    args = bench(url, "--random-input-len", "16", "--random-output-len", "8", "--max-concurrency", "4")
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in printed
    for label in ("Successful requests:", "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):", "P90 E2EL (ms):"):
        assert label in printed
    rec = json.loads(out.read_text())
    assert rec["bench"] == "serve" and rec["config"]["model"] == "tiny"
    r = rec["results"]
    assert r["completed"] == 12 and r["failed"] == 0
    assert r["total_input_tokens"] == 12 * 16  # token-id prompts: exact lengths
    assert r["total_output_tokens"] == 12 * 8  # ignore_eos: exactly max_tokens
    assert 0 < r["median_ttft_ms"] <= r["median_e2el_ms"]
    assert r["mean_tpot_ms"] > 0 and r["p99_itl_ms"] >= r["median_itl_ms"]
    assert r["request_throughput"] == pytest.approx(12 / r["duration_s"])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


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
