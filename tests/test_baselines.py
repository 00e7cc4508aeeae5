"""The benchmark baselines compute the same model as megatier, so their timings compare like with like."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from megatier.bench.baselines import TorchGraphDecoder, hf_model
from megatier.config import load_config
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.loader import dummy_weights

CPU = torch.device("cpu")


@pytest.fixture(params=["llama-llama3rope-tied-bias", "qwen3-headdim24"])
def model(request, tmp_path):
    path, _ = make_hf_model(tmp_path, request.param)
    cfg = load_config(path)
    return path, cfg, dummy_weights(cfg, seed=3, dtype=torch.float32, device=CPU)


def reference_greedy(cfg, weights, prompt: list[int], steps: int) -> list[int]:
    ex = ReferenceExecutor(cfg, weights, cache=KVCache.allocate(cfg, 16, 4, torch.float32, CPU))
    pages = list(range(16))
    tokens = [int(ex.forward(StepBatch(prompt, [0], [len(prompt)], [pages]))[0].argmax())]
    for i in range(steps - 1):
        tokens.append(int(ex.forward(StepBatch([tokens[-1]], [len(prompt) + i], [1], [pages]))[0].argmax()))
    return tokens


def test_hf_model_holds_our_weights(model):
    path, cfg, weights = model
    prompt = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        hf = hf_model(path, weights, CPU, torch.float32)
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert expected[0, 9:].tolist() == reference_greedy(cfg, weights, prompt, 12)


@pytest.mark.parametrize("compile_mode", [None, pytest.param("max-autotune-no-cudagraphs", marks=pytest.mark.slow)])
def test_torch_graph_decoder_decodes_like_the_reference(model, compile_mode):
    """Eager and torch.compile'd steps (the two PyTorch baselines) compute the reference model."""
    _, cfg, weights = model
    prompt = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    dec = TorchGraphDecoder(
        cfg, weights, batch=2, max_len=32, device=CPU, dtype=torch.float32, compile_mode=compile_mode
    )
    for column in prompt.T:  # feed the prompt one token per step, as a decode loop would
        dec.tokens.copy_(column)
        dec.step()
    generated = [dec.tokens.tolist()]
    for _ in range(9):
        dec.step()
        generated.append(dec.tokens.tolist())
    for b in range(2):
        assert [g[b] for g in generated] == reference_greedy(cfg, weights, prompt[b].tolist(), 10)
    if compile_mode is not None:  # one graph for every layer plus the head: no recompilation per layer
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 2
