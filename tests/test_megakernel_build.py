"""The CUDA source compiles with NVRTC for sm_90a (no GPU needed), without spills, and is cached."""

from __future__ import annotations

import dataclasses
import io
import re

import pytest

from megakernel_helpers import llama_1b_config, toy_config
from megatier.errors import MegatierError
from megatier.executors.megakernel.build import KernelConfig, check_supported, compile_cubin

pytest.importorskip("cuda.core")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATIER_CACHE_DIR", str(tmp_path))


def _compile(cfg, batch: int, timeline: bool = False) -> tuple[bytes, str]:
    log = io.StringIO()
    return compile_cubin(KernelConfig(cfg, batch, 16, 64, timeline), log), log.getvalue()


@pytest.mark.parametrize(("name", "batch"), [("llama-1b", 1), ("llama-1b", 8), ("qwen3", 2), ("llama-tied-bias", 3)])
def test_compiles_for_sm90a_with_at_most_a_tiny_spill(name, batch):
    cfg = llama_1b_config() if name == "llama-1b" else toy_config(name)
    cubin, log = _compile(cfg, batch)
    assert cubin[:4] == b"\x7fELF"
    spilled = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    assert spilled <= 16, log  # at most a register or so outside the inner loops (batch 8: 4 bytes)
    frames = [int(n) for n in re.findall(r"(\d+) bytes stack frame", log)]
    assert max(frames) == 0, log  # a stack frame means local memory (say, a struct passed by reference to a call)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    assert regs <= 168  # 9 warps are allocated as 12: 65536 / 384 registers per thread, one CTA per SM


@pytest.mark.parametrize("group", [1, 7])
def test_attention_compiles_when_query_heads_do_not_divide_the_warps(group):
    """Attention gives each query head its own warps: with 7 heads per kv head (Qwen2-7B) head 0 gets two of
    the 8, with 1 all 8 share the head."""
    cfg = dataclasses.replace(toy_config("llama-tied-bias"), num_heads=2 * group, num_kv_heads=2)
    cubin, log = _compile(cfg, 1)
    assert cubin[:4] == b"\x7fELF"
    assert int(re.search(r"(\d+) bytes spill stores", log).group(1)) <= 16, log


def test_timeline_variant_compiles_and_cache_hits(tmp_path):
    cfg = toy_config("qwen2")
    first, log = _compile(cfg, 1, timeline=True)
    assert log  # compiled: ptxas reported
    assert len(list((tmp_path / "cubin").glob("*.cubin"))) == 1  # under $MEGATIER_CACHE_DIR, like every cache
    again, log = _compile(cfg, 1, timeline=True)
    assert again == first and log == ""  # from the disk cache


def test_llama_1b_ring_keeps_six_stages_of_32k_chunks():
    layout = KernelConfig(llama_1b_config(), 1, 16, 1024).layout
    assert layout["KC_MAX"] == 1024 and layout["NSTAGES"] == 6
    assert layout["SMEM_BYTES"] <= 227 * 1024


@pytest.mark.parametrize(
    ("change", "batch", "message"),
    [
        (dict(head_dim=24), 1, "head_dim"),
        (dict(hidden_size=72), 1, "hidden_size"),
        ({}, 9, "batch"),
        (dict(num_heads=32, num_kv_heads=2), 1, "query heads per kv head"),
    ],
)
def test_unsupported_configs_fail_clearly(change, batch, message):
    cfg = dataclasses.replace(toy_config("llama-mqa"), **change)
    with pytest.raises(MegatierError, match=message):
        check_supported(cfg, batch)


def test_held_stages_leave_one_free_and_the_unthrottled_loader_compiles():
    """Holding every stage would deadlock an instruction longer than the ring; in_flight 0 and hold 0
    (the measured alternatives) still compile."""
    for batch in (1, 8):
        d = KernelConfig(llama_1b_config(), batch, 16, 64, hold=99).defines()
        assert int(d["HOLD_STAGES"]) == int(d["NSTAGES"]) - 1
    cubin = compile_cubin(KernelConfig(toy_config("qwen2"), 2, 16, 64, in_flight=0, hold=0))
    assert cubin[:4] == b"\x7fELF"
