"""The megakernel's program, run by the CPU interpreter, against the reference model on toy configs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megakernel_helpers import decode_batch, garbage_kv, page_tables, prefill, random_prompts, toy_config
from megatier.executors.base import StepBatch
from megatier.executors.megakernel.interp import DeadlockError, Interpreter
from megatier.executors.megakernel.layout import Dims, StepBuffers, rope_table
from megatier.executors.megakernel.schedule import Program, build_program
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.loader import dummy_weights
from megatier.weights import pack_weights

PAGE = 4
NUM_PAGES = 64
LENGTHS = [5, 17, 1]  # prompt lengths: one sequence starts decoding at position 0


def _setup(case: str, splits: int = 1, seed: int = 0):
    cfg = toy_config(case)
    weights = dummy_weights(cfg, seed, torch.float32, torch.device("cpu"))
    cache = KVCache.allocate(cfg, NUM_PAGES, PAGE, torch.float32, torch.device("cpu"))
    garbage_kv(cache, seed + 1)
    prompts = random_prompts(LENGTHS, cfg.vocab_size, seed)
    tables = page_tables([n + 4 for n in LENGTHS], PAGE, NUM_PAGES, seed)
    prefill(cfg, weights, cache, prompts, tables)
    d = Dims.of(cfg, len(LENGTHS), splits, PAGE, NUM_PAGES)
    interp = Interpreter(cfg, pack_weights(weights, "cpu", torch.float32), cache, rope_table(cfg, 256, "cpu"))
    return cfg, weights, cache, prompts, tables, d, interp


def _run(interp, program: Program, batch: StepBatch, steps: int = 1, **kw) -> StepBuffers:
    bufs = StepBuffers.allocate(program.dims, torch.float32, "cpu", max_steps=steps)
    bufs.poison()
    bufs.load(batch.token_ids, batch.starts, batch.page_tables)
    for _ in range(steps):
        interp.run(program, bufs, **kw)
    return bufs


@pytest.mark.parametrize("case", ["llama-tied-bias", "llama-mqa", "qwen2", "qwen3"])
@pytest.mark.parametrize("splits", [1, 3])
def test_interpreter_matches_reference_over_steps(case, splits):
    """Three greedy steps with the token fed back: logits and tokens equal the reference's."""
    cfg, weights, cache, prompts, tables, d, interp = _setup(case, splits)
    ref_cache = KVCache(cache.kv.clone())
    ref = ReferenceExecutor(cfg, weights, cache=ref_cache)
    batch = decode_batch(prompts, tables)
    program = build_program(d, num_sms=5)
    bufs = StepBuffers.allocate(d, torch.float32, "cpu", max_steps=3)
    bufs.poison()
    bufs.load(batch.token_ids, batch.starts, batch.page_tables)
    tokens, starts = list(batch.token_ids), list(batch.starts)
    for step in range(3):
        want = ref.forward(StepBatch(tokens, starts, [1] * len(tokens), tables))
        interp.run(program, bufs, order="random", seed=step)
        torch.testing.assert_close(bufs.logits, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1).tolist()
        assert bufs.out_tokens[step].tolist() == tokens
        starts = [s + 1 for s in starts]
    assert bufs.pos.tolist() == starts
    assert int(bufs.state[0]) == 3  # epoch: counters were never reset between steps


def test_logits_bitwise_identical_across_assignments():
    _, _, cache, prompts, tables, d, interp = _setup("llama-tied-bias", splits=2)
    batch = decode_batch(prompts, tables)
    saved = cache.kv.clone()
    results = []
    for num_sms, strategy, seed in [(1, "balanced", 0), (7, "round_robin", 0), (13, "random", 3), (4, "random", 9)]:
        cache.kv.copy_(saved)
        bufs = _run(interp, build_program(d, num_sms, strategy, seed), batch, order="random", seed=seed)
        results.append(bufs.logits.clone())
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_deadlock_detected():
    _, _, _, prompts, tables, d, interp = _setup("llama-mqa")
    program = build_program(d, num_sms=3)
    victim = next(i for i in program.instrs if i.wait is not None)
    bad = type(victim)(**{**victim.__dict__, "wait": (victim.wait[0], victim.wait[1] + 1)})
    queues = [[bad if i is victim else i for i in q] for q in program.queues]
    with pytest.raises(DeadlockError, match=f"#{victim.index}"):
        _run(interp, Program(d, 3, program.instrs, queues), decode_batch(prompts, tables))


def _cpu_capabilities() -> list[str]:
    """Every ATen vector capability this CPU runs: the interpreter must be grouping-invariant on each."""
    best = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(best) + 1] if best in order else ["default", best]


@pytest.mark.parametrize("capability", _cpu_capabilities())
def test_bitwise_identical_under_each_cpu_capability(capability):
    """torch's vectorized exp changes by an ULP between full vectors and tails, at offsets that depend
    on the vector width: run the bitwise test with each capability the CPU has forced."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().lower() == capability
    test = f"{__file__}::test_logits_bitwise_identical_across_assignments"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-2000:]
