"""Backend choice (auto: the megakernel on sm_90, graph on other GPUs, reference on CPU) and the
megakernel backend inside the engine."""

from __future__ import annotations

import pytest
import torch

from megatier import LLM, MegatierError, SamplingParams
from megatier.config import load_config
from megatier.executors import choose_backend
from megatier.executors.base import StepBatch
from megatier.kv.pages import KVCache
from megatier.loader import resolve_model


def cache_for(model: str, dtype: torch.dtype, device: str) -> tuple:
    cfg = load_config(resolve_model(model))
    return cfg, KVCache.allocate(cfg, 4, 16, dtype, torch.device(device))


def test_auto_is_the_reference_on_cpu():
    cfg, cache = cache_for("qwen2.5-0.5b", torch.float32, "cpu")
    assert choose_backend("auto", cfg, cache) == "reference"


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
def test_megakernel_generates_what_graph_generates():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the megakernel needs sm_90")
    kw = dict(load_format="dummy", max_model_len=512, kv_cache_gb=2.0)
    prompts = [torch.randint(0, 128256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 40, 17)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    mk = LLM("llama-3.2-1b", backend="megakernel", **kw)
    assert mk.backend == "megakernel"
    small = [o.token_ids for o in mk.generate(prompts, params)]
    large = [o.token_ids for o in mk.generate(prompts * 4, params)]  # 12 sequences: beyond the megakernel
    del mk
    graph = LLM("llama-3.2-1b", backend="graph", **kw)
    # 12 sequences decode in the megakernel's own GraphExecutor: the very same computation.
    assert large == [o.token_ids for o in graph.generate(prompts * 4, params)]
    # Two bf16 paths sum in different orders, so near-ties may go either way: every token the megakernel
    # chose must be the graph path's greedy choice within bf16 noise, fed the same history.
    ex = graph.engine.executor
    pages = list(range(ex.num_pages))
    for prompt, tokens in zip(prompts, small, strict=True):
        logits = ex.forward(StepBatch(prompt, [0], [len(prompt)], [pages]))[0]
        for i, token in enumerate(tokens):
            assert logits[token] >= logits.max() - 0.25, f"step {i}: {logits.max() - logits[token]:.3f} below best"
            logits = ex.forward(StepBatch([token], [len(prompt) + i], [1], [pages]))[0]
