"""Tensor parallelism (parallel.py, executors/tensor_parallel.py): the shards against the unsharded
matmuls in this process, and TP=2 over gloo (two processes) against the single-process reference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from conftest import ARCH_CASES, make_hf_model, write_byte_tokenizer
from megatier import LLM, SamplingParams
from megatier.args import EngineArgs
from megatier.cli import build_parser
from megatier.config import load_config
from megatier.errors import MegatierError
from megatier.executors import tensor_parallel
from megatier.executors.base import StepBatch
from megatier.loader import load_safetensors_weights
from megatier.parallel import check_tensor_parallel, shard_weights
from megatier.quant.schemes import apply_quantization

BIAS_CASE = "llama-llama3rope-tied-bias"  # every bias (o and down ones added after the all-reduce), tied head


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", sorted(c for c in ARCH_CASES if c != "llama-mqa-untied"))
def test_shards_recompose_the_unsharded_layer(tmp_path, case):
    """Column-parallel q/k/v/gate/up outputs are slices of the full ones; row-parallel o and down hold a
    slice of their input dimension, so the ranks' products sum to the full matmul."""
    path, _ = make_hf_model(tmp_path, case)
    cfg = load_config(path)
    full = load_safetensors_weights(path, cfg)
    shards = [shard_weights(full, cfg, rank, 2) for rank in range(2)]
    layer = full.layers[1]
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, cfg.hidden_size, generator=g)
    attn = torch.randn(3, cfg.q_size, generator=g)
    act = torch.randn(3, cfg.intermediate_size, generator=g)
    for name, width in (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("gate_proj", cfg.intermediate_size)):
        parts = [h @ getattr(s.layers[1], name).T for s in shards]
        assert all(p.shape == (3, width // 2) for p in parts)
        torch.testing.assert_close(torch.cat(parts, dim=1), h @ getattr(layer, name).T)
    for name, x, width in (("o_proj", attn, cfg.q_size), ("down_proj", act, cfg.intermediate_size)):
        assert all(getattr(s.layers[1], name).shape == (cfg.hidden_size, width // 2) for s in shards)
        halves = x.chunk(2, dim=1)
        total = sum(half @ getattr(s.layers[1], name).T for half, s in zip(halves, shards, strict=True))
        torch.testing.assert_close(total, x @ getattr(layer, name).T)
    if layer.q_bias is not None:
        torch.testing.assert_close(torch.cat([s.layers[1].q_bias for s in shards]), layer.q_bias)
    if layer.o_bias is not None:  # added once, after the all-reduce: every rank keeps it whole
        assert all(torch.equal(s.layers[1].o_bias, layer.o_bias) for s in shards)


def test_lm_head_shards_are_padded_vocab_rows(tmp_path):
    path, _ = make_hf_model(tmp_path, BIAS_CASE)
    cfg = load_config(path)
    full = load_safetensors_weights(path, cfg)
    heads = [shard_weights(full, cfg, rank, 7).lm_head for rank in range(7)]  # 300 = 6 * 43 + 42
    assert {h.shape for h in heads} == {(43, cfg.hidden_size)}
    torch.testing.assert_close(torch.cat(heads)[: cfg.vocab_size], full.lm_head)
    assert torch.count_nonzero(heads[-1][-1]) == 0


def test_bad_tensor_parallel_settings_are_one_line_errors(tmp_path):
    path, _ = make_hf_model(tmp_path, "llama-mqa-untied")
    cfg = load_config(path)
    cpu = torch.device("cpu")
    cases = [
        (dict(size=2, backend="reference", device=cpu, tiered=False), "must divide the model's num_kv_heads 1"),
        (dict(size=0, backend="reference", device=cpu, tiered=False), "tensor_parallel_size must be >= 1, got 0"),
        (dict(size=2, backend="graph", device=cpu, tiered=False), "needs backend 'reference', not 'graph'"),
        (dict(size=2, backend="auto", device=torch.device("cuda"), tiered=False), "runs on device 'cpu' (gloo)"),
        (dict(size=2, backend="auto", device=cpu, tiered=True), "not the tiered one"),
    ]
    for kwargs, message in cases:
        size = kwargs.pop("size")
        with pytest.raises(MegatierError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            check_tensor_parallel(size, replace(cfg, num_heads=4), **kwargs)
        assert "\n" not in str(e.value)
    check_tensor_parallel(1, cfg, backend="graph", device=cpu, tiered=True)  # TP=1: nothing to check
    with pytest.raises(MegatierError, match="must divide the model's num_heads 4"):
        check_tensor_parallel(8, cfg, backend="auto", device=cpu, tiered=False)
    with pytest.raises(MegatierError, match="must divide the model's num_kv_heads 1"):
        LLM(path, tensor_parallel_size=2)
    assert not dist.is_initialized()
    with pytest.raises(MegatierError, match="needs plain weights, not FP8 blocks: pass quantization='none'"):
        shard_weights(apply_quantization(load_safetensors_weights(path, cfg), "fp8"), cfg, 0, 2)


def test_cli_flag():
    args = build_parser().parse_args(["generate", "hi", "--tensor-parallel-size", "2"])
    assert EngineArgs.from_cli(args).tensor_parallel_size == 2
    assert EngineArgs().tensor_parallel_size == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tp"), BIAS_CASE)
    write_byte_tokenizer(path)
    return path


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 300, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


@pytest.fixture(scope="class")
def pair(tiny):
    """(TP=1 LLM, TP=2 LLM) of the tiny model in fp32; prompts prefill in chunks beside decodes."""
    single = LLM(tiny, max_num_batched_tokens=32)
    with LLM(tiny, tensor_parallel_size=2, max_num_batched_tokens=32) as tp:
        yield single, tp


@pytest.mark.slow
class TestAgainstTP1:
    """One TP=2 LLM for these tests (class scope: closed before the tests below start their own)."""

    def test_tp2_greedy_tokens_equal_tp1(self, pair):
        single, tp = pair
        batch = prompts(5, seed=11)
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        expected = [o.token_ids for o in single.generate(batch, params)]
        assert [o.token_ids for o in tp.generate(batch, params)] == expected
        assert len({tuple(t) for t in expected}) > 1

    def test_tp2_sampled_with_a_seed_equals_tp1(self, pair):
        single, tp = pair
        batch = prompts(3, seed=12)
        params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=7, ignore_eos=True, n=2)
        expected = [[c.token_ids for c in o.outputs] for o in single.generate(batch, params)]
        assert [[c.token_ids for c in o.outputs] for o in tp.generate(batch, params)] == expected
        assert [[c.token_ids for c in o.outputs] for o in tp.generate(batch, params)] == expected

    def test_tp2_logits_match_tp1(self, pair):
        """A prefill of two prompts (every logit of one), then decode steps: fp32 within 1e-5 relative."""
        single, tp = pair
        a, b = prompts(2, seed=13)
        tables = [[5, 2, 9], [0, 7, 3]]
        steps = [StepBatch(a + b, [0, 0], [len(a), len(b)], tables, all_logits=frozenset({1}))]
        steps += [StepBatch([3 + i, 250 - i], [len(a) + i, len(b) + i], [1, 1], tables) for i in range(5)]
        for step in steps:
            ours, theirs = tp.engine.executor.forward(step), single.engine.executor.forward(step)
            assert ours.shape == theirs.shape == (sum(step.logit_counts()), 300)
            assert rel_err(ours, theirs) < 1e-5


def worker_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_close_stops_the_workers_and_frees_the_process_group(tiny):
    llm = LLM(tiny, tensor_parallel_size=2)
    pids = llm.engine.executor.worker_pids
    assert len(pids) == 1 and not worker_gone(pids[0])
    llm.close()
    assert all(worker_gone(pid) for pid in pids) and not dist.is_initialized()
    llm.close()  # twice is fine
    with pytest.raises(MegatierError, match="workers are stopped"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2))
    with LLM(tiny, tensor_parallel_size=2) as again:  # the process can start another group
        assert len(again.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) == 3


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_dead_worker_is_a_clear_error_not_a_hang(tiny):
    llm = LLM(tiny, tensor_parallel_size=2)
    (pid,) = llm.engine.executor.worker_pids
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(MegatierError, match=f"worker rank 1 exited with code {-signal.SIGKILL}"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=4))
    assert time.monotonic() - t0 < 10
    assert not dist.is_initialized()
    llm.close()


@pytest.mark.timeout(60)
def test_a_worker_that_fails_to_start_is_a_clear_error(tiny, tmp_path, monkeypatch):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\ncat > /dev/null\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(tensor_parallel.sys, "executable", str(broken))
    with pytest.raises(MegatierError, match="worker rank 1 exited with code 3 while starting"):
        LLM(tiny, tensor_parallel_size=2)
    assert not dist.is_initialized()


@pytest.mark.slow
def test_tp2_bf16_errs_as_tp1_bf16_does(tiny):
    """bf16 partial sums are all-reduced in bf16: versus fp32, TP=2 may err no more than the project's bf16
    tolerance for TP=1 (tests/test_reference.py)."""
    batch = prompts(3, seed=14)
    tables = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    step = StepBatch([t for p in batch for t in p], [0, 0, 0], [len(p) for p in batch], tables)
    exact = LLM(tiny).engine.executor.forward(step)
    one = LLM(tiny, dtype="bfloat16").engine.executor.forward(step)
    with LLM(tiny, dtype="bfloat16", tensor_parallel_size=2) as tp:
        two = tp.engine.executor.forward(step)
    assert rel_err(two, exact) <= 1.5 * rel_err(one, exact) + 1e-3


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cli_generate_with_two_processes_exits_cleanly(tiny):
    """No close(): the workers stop at exit, and the completion is TP=1's."""
    args = ["generate", "--model", str(tiny), "--max-tokens", "8", "--ignore-eos", "--tensor-parallel-size", "2"]
    out = subprocess.run(
        [sys.executable, "-m", "megatier", *args, "abc"], capture_output=True, text=True, timeout=100, check=True
    )
    expected = LLM(tiny).generate("abc", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].text
    assert out.stdout == "abc" + expected + "\n"
