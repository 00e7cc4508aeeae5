"""Backend choice (auto: the megakernel on sm_90, graph on other GPUs, reference on CPU) and the
megakernel backend inside the engine."""

from __future__ import annotations

import pytest
import torch

from fp32_oracle import assert_greedy_under_fp32
from megatier import LLM, MegatierError, SamplingParams
from megatier.config import load_config
from megatier.executors import choose_backend
from megatier.executors.base import StepBatch
from megatier.kv.pages import KVCache
from megatier.loader import dummy_weights, resolve_model


def cache_for(model: str, dtype: torch.dtype, device: str) -> tuple:
    cfg = load_config(resolve_model(model))
    return cfg, KVCache.allocate(cfg, 4, 16, dtype, torch.device(device))


def test_auto_is_the_cpu_backend_on_the_host():
    cfg, cache = cache_for("qwen2.5-0.5b", torch.float32, "cpu")
    assert choose_backend("auto", cfg, cache) == "cpu"


@pytest.mark.parametrize("backend", ["graph", "megakernel"])
def test_gpu_backends_refuse_the_cpu(backend):
    cfg, cache = cache_for("qwen2.5-0.5b", torch.float32, "cpu")
    with pytest.raises(MegatierError, match=f"backend '{backend}' needs a CUDA device"):
        choose_backend(backend, cfg, cache)


def test_unknown_backend():
    cfg, cache = cache_for("qwen2.5-0.5b", torch.float32, "cpu")
    with pytest.raises(MegatierError, match="unknown backend 'tpu'"):
        choose_backend("tpu", cfg, cache)


@pytest.mark.gpu
def test_auto_is_the_megakernel_on_hopper_and_graph_otherwise(caplog):
    cfg, cache = cache_for("llama-3.2-1b", torch.bfloat16, "cuda")
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert choose_backend("auto", cfg, cache) == ("megakernel" if hopper else "graph")
    cfg32, cache32 = cache_for("llama-3.2-1b", torch.float32, "cuda")
    with caplog.at_level("INFO", logger="megatier.executors"):
        assert choose_backend("auto", cfg32, cache32) == "graph"
    assert "graph, not the megakernel (needs bfloat16, got float32)" in caplog.text


@pytest.mark.gpu
def test_megakernel_refuses_float32_with_a_reason():
    with pytest.raises(MegatierError, match="megakernel: needs bfloat16"):
        LLM("qwen2.5-0.5b", load_format="dummy", backend="megakernel", dtype="float32", kv_cache_gb=0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("copies", [1, 4])  # 3 sequences in the megakernel; 12 in its GraphExecutor
def test_megakernel_engine_tokens_are_greedy_under_fp32(copies):
    """Whole-engine greedy tokens (prefill, first token on the device, pipelined chunks) checked against
    the fp32 reference on the same weights, fed the same tokens: each chosen token must be the fp32
    argmax within a plain bf16 run's noise."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the megakernel needs sm_90")
    prompts = [torch.randint(0, 128256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 40, 17)]
    prompts = prompts * copies
    steps = 32
    mk = LLM("llama-3.2-1b", backend="megakernel", load_format="dummy", max_model_len=512, kv_cache_gb=2.0)
    assert mk.backend == "megakernel"
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    outputs = [o.token_ids for o in mk.generate(prompts, params)]
    cfg, seed = mk.config, mk.seed
    del mk
    assert len({t for out in outputs for t in out}) > 3  # the model does not just repeat a token
    weights = dummy_weights(cfg, seed, torch.bfloat16, torch.device("cuda"))
    pages_each = -(-(max(map(len, prompts)) + steps) // 16)
    tables = [list(range(i * pages_each, (i + 1) * pages_each)) for i in range(len(prompts))]
    prefill = StepBatch([t for p in prompts for t in p], [0] * len(prompts), [len(p) for p in prompts], tables)
    tokens = [list(step) for step in zip(*outputs, strict=True)]
    assert_greedy_under_fp32(cfg, weights, torch.device("cuda"), tokens, prefill, pages_each * len(prompts), 16)
