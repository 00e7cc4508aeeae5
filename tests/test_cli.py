"""The command line: help, streaming generate, the chat REPL, bench latency, and error exits."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_model, write_byte_tokenizer
from megatier import LLM, SamplingParams
from megatier.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("llama"), "llama-llama3rope-tied-bias")
    write_byte_tokenizer(path)
    return path


def test_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "megatier", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for word in ("generate", "chat", "bench", "embedded"):
        assert word in out


def test_generate_streams_the_completion(tiny, capsys):
    assert main(["generate", "--model", str(tiny), "--max-tokens", "12", "--ignore-eos", "abc"]) == 0
    expected = LLM(str(tiny)).generate("abc", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].text
    assert capsys.readouterr().out == "abc" + expected + "\n"


def test_generate_with_structured_output_flags(tiny, tmp_path, capsys):
    base = ["generate", "--model", str(tiny), "--max-tokens", "60", "--temperature", "1", "--seed", "3", "n:"]
    assert main([*base, "--regex", "[0-9]{4}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("n:") and len(out) == len("n:") + 5 and out[2:6].isdigit()
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            }
        )
    )
    assert main([*base, "--json-schema-file", str(schema)]) == 0
    assert isinstance(json.loads(capsys.readouterr().out[2:])["ok"], bool)
    assert main([*base, "--json-schema-file", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main([*base, "--json-schema", '{"type": "objectx"}']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid structured output") and err.count("\n") == 1


def test_chat_repl_keeps_history(tiny, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nsecond\n/exit\n"))
    assert main(["chat", "--model", str(tiny), "--max-tokens", "6", "--ignore-eos"]) == 0
    llm = LLM(str(tiny))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.chat([{"role": "user", "content": "hi"}], params)[0].text
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "second"},
    ]
    second = llm.chat(history, params)[0].text
    assert capsys.readouterr().out == f"> {first}\n> {second}\n> "


def test_bench_latency_writes_a_record(tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["bench", "latency", "--model", str(tiny), "--batch", "1,2", "--input-len", "5", "--output-len", "6"]
    assert main([*args, "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [(r["backend"], r["batch"], r["input_len"]) for r in rows] == [("cpu", 1, 5), ("cpu", 2, 5)]
    assert all(r["decode_step_us"] > 0 for r in rows) and "decode step" in capsys.readouterr().out


def test_bench_latency_times_a_sampled_decode(tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["bench", "latency", "--model", str(tiny), "--input-len", "5", "--output-len", "6", "--iters", "1"]
    assert main([*args, "--temperature", "0,0.7", "--top-p", "0.95", "--json", str(out)]) == 0
    greedy, sampled = json.loads(out.read_text())["results"]["rows"]
    assert (greedy["temperature"], greedy["top_p"], sampled["temperature"], sampled["top_p"]) == (0, 1, 0.7, 0.95)
    assert "vs_greedy" not in greedy
    assert sampled["vs_greedy"] == pytest.approx(sampled["decode_step_us"] / greedy["decode_step_us"])
    assert "T 0.7 top-p 0.95" in capsys.readouterr().out


def test_bench_latency_runs_each_quantization_with_its_weight_bytes(tiny, tmp_path):
    """--quantization none,fp8 loads the model twice in one process; each row counts the weight bytes its
    executor holds (FP8 projections at 1 byte and a scale per row, the tied embedding in fp32)."""
    out = tmp_path / "r.json"
    args = ["bench", "latency", "--model", str(tiny), "--input-len", "5", "--output-len", "4", "--iters", "1"]
    assert main([*args, "--quantization", "none,fp8", "--json", str(out)]) == 0
    plain, fp8 = json.loads(out.read_text())["results"]["rows"]
    assert (plain["quantization"], fp8["quantization"]) == ("none", "fp8")
    weights = LLM(str(tiny), quantization="fp8").engine.executor.w
    assert fp8["weight_bytes"] == weights.nbytes(torch.float32) < plain["weight_bytes"] == 4 * weights.numel()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/no/such/model", "x"], "no such file or directory"),
        (["generate", "--temperature", "-1", "--model", "{tiny}", "x"], "temperature must be >= 0"),
        (["generate", "--device", "tpu", "--model", "{tiny}", "x"], "unknown device 'tpu'"),
        (["bench", "latency", "--model", "{tiny}", "--baselines", "torch-graph"], "unknown baseline 'torch-graph'"),
        (["bench", "latency", "--model", "{tiny}", "--quantization", "none,int4"], "unknown quantization 'int4'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny, capsys, argv, message):
    assert main([a.replace("{tiny}", str(tiny)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bench_latency_rejects_a_malformed_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "latency", "--temperature", "0,x"])
    assert exit_info.value.code == 2
    assert "--temperature: expected comma-separated numbers, got '0,x'" in capsys.readouterr().err


def test_engine_options_are_checked_by_name(tiny):
    """An unknown or out-of-range engine option is a one-line error naming it, before anything loads."""
    from megatier.errors import MegatierError

    with pytest.raises(MegatierError, match="max_num_sequences"):
        LLM(str(tiny), max_num_sequences=4)
    with pytest.raises(MegatierError, match="max_num_batched_tokens"):
        LLM(str(tiny), max_num_batched_tokens=0)
