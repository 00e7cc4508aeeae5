"""The CPU backend (executors/cpu.py, cpu_step.c) against the reference executor on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors import resolve_backend
from megatier.executors.base import StepBatch
from megatier.executors.cpu import CpuExecutor, stack
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.loader import dummy_weights
from megatier.quant.blocks import from_gguf, quantize_fp8
from megatier.weights import ModelWeights

CPU = torch.device("cpu")
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(**kw) -> ModelConfig:
    base = dict(
        architecture="llama", vocab_size=80, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
    )  # fmt: skip
    return ModelConfig(**(base | kw))


def quantize(m: torch.Tensor, kind: str):
    if kind == "plain":
        return m
    if kind == "FP8":
        return quantize_fp8(m)
    return from_gguf(kind, quants.quantize(m.numpy(), GGMLQuantizationType[kind]), tuple(m.shape), "t")


def weights_for(cfg: ModelConfig, kinds: dict[str, str], seed: int = 0) -> ModelWeights:
    """Seeded weights with each matrix (by LayerWeights field) in kinds[field] (default Q4_1)."""
    w = dummy_weights(cfg, seed, torch.float32, CPU)
    for layer in w.layers:
        for name in MATRICES:
            setattr(layer, name, quantize(getattr(layer, name), kinds.get(name, "Q4_1")))
    w.lm_head = quantize(w.lm_head, "Q8_0")
    return w


def pair(cfg: ModelConfig, kinds: dict[str, str], dtype=torch.float32, pages: int = 40, page_size: int = 4):
    """(reference, cpu) executors on equal weights, each on its own NaN-poisoned cache."""

    def cache() -> KVCache:
        c = KVCache.allocate(cfg, pages, page_size, dtype, CPU)
        c.kv.fill_(float("nan"))
        return c

    ref = ReferenceExecutor(cfg, weights_for(cfg, kinds), cache=cache())
    return ref, CpuExecutor(cfg, weights_for(cfg, kinds), cache=cache())


def poison(ex: CpuExecutor) -> None:
    """NaN in every buffer of the one-call step, so a part no kernel writes shows up in the logits."""
    with torch.inference_mode():  # the buffers were made inside forward's inference mode
        for step in ex.host_steps.values():
            for buf in (step.h, step.qkv, step.q, step.attn, step.lse, step.tmp, step.gu, step.act):
                buf.fill_(float("nan"))


def run_both(ref, ex, prompt_lens: list[int], steps: int, seed: int = 0) -> None:
    """Prefill, then decode steps of random tokens on scattered pages; logits and KV compared each step."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    vocab = ref.cfg.vocab_size
    order = rng.permutation(ref.cache.num_pages).tolist()
    per_seq = ref.cache.num_pages // len(prompt_lens)
    tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(len(prompt_lens))]
    first = [n // 2 for n in prompt_lens]  # two prompt chunks: the second attends to the first's KV
    rest = [n - a for n, a in zip(prompt_lens, first, strict=True)]
    for starts, lens_now in (([0] * len(first), first), (first, rest)):
        tokens = torch.randint(vocab, (sum(lens_now),), generator=g).tolist()
        batch = StepBatch(tokens, starts, lens_now, tables)
        torch.testing.assert_close(ex.forward(batch), ref.forward(batch), rtol=1e-4, atol=1e-4)
    lens = list(prompt_lens)
    for _ in range(steps):
        poison(ex)
        batch = StepBatch(torch.randint(vocab, (len(lens),), generator=g).tolist(), list(lens), [1] * len(lens), tables)
        got, want = ex.forward(batch), ref.forward(batch)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        lens = [n + 1 for n in lens]
    torch.testing.assert_close(ex.cache.kv, ref.cache.kv, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q4_0", "FP8"])
@pytest.mark.parametrize("prompt_lens", [[5], [3, 9, 2]])
def test_one_call_decode_equals_the_reference(kind, prompt_lens):
    cfg = config()
    ref, ex = pair(cfg, dict.fromkeys(MATRICES, kind))
    assert ex.one_call_off is None
    run_both(ref, ex, prompt_lens, steps=6)  # crosses page boundaries (page size 4)
    assert set(ex.host_steps) == {len(prompt_lens)}


def test_one_call_decode_with_biases_and_tied_embeddings():
    cfg = config(architecture="qwen2", qkv_bias=True, tie_word_embeddings=True)
    ref, ex = pair(cfg, {})
    assert ex.one_call_off is None and ex.w.layers[0].q_bias is not None
    run_both(ref, ex, [2, 6], steps=5, seed=1)


@pytest.mark.parametrize(
    ("cfg", "kinds", "dtype", "why"),
    [
        (config(), {"q_proj": "Q8_0"}, torch.float32, "in different formats"),
        (config(), dict.fromkeys(MATRICES, "plain"), torch.float32, "not all in the C matmul's block formats"),
        (config(), {}, torch.bfloat16, "dtype bfloat16"),
        (config(architecture="qwen3", qk_norm=True), {}, torch.float32, "q/k norms"),
    ],
)
def test_layer_by_layer_where_one_call_cannot_run(cfg, kinds, dtype, why):
    ref, ex = pair(cfg, kinds, dtype)
    assert why in ex.one_call_off
    if dtype == torch.float32:
        run_both(ref, ex, [4, 7], steps=3, seed=2)
    assert not ex.host_steps


def test_stacking_keeps_each_matrix_as_a_view_and_refuses_mixed_formats():
    cfg = config()
    w = weights_for(cfg, {"k_proj": "Q8_0"})
    layer = w.layers[0]
    assert stack([layer.q_proj, layer.k_proj], [None, None]) is None
    ex = CpuExecutor(cfg, weights_for(cfg, {}), cache=KVCache.allocate(cfg, 8, 4, torch.float32, CPU))
    layer = ex.w.layers[0]
    stacked = ex.gate_up[id(layer)].matrix
    assert layer.up_proj.planes["q"].data_ptr() == stacked.planes["q"][cfg.intermediate_size :].data_ptr()


def test_the_cpu_backend_refuses_a_gpu_device():
    with pytest.raises(MegatierError, match="backend 'cpu' runs on the host"):
        resolve_backend("cpu", torch.device("cuda"))
