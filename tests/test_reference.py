"""The reference executor against Hugging Face transformers, and the paged KV cache against itself."""

from __future__ import annotations

import pytest
import torch

from megatier.config import load_config
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.loader import load_safetensors_weights


def make_executor(path, dtype=torch.float32, num_pages=64, page_size=4) -> ReferenceExecutor:
    cfg = load_config(path)
    cache = KVCache.allocate(cfg, num_pages, page_size, dtype, torch.device("cpu"))
    cache.kv.fill_(float("nan"))  # poison: any read of an unwritten position shows up in the logits
    return ReferenceExecutor(cfg, load_safetensors_weights(path, cfg), cache=cache)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_prefill_decode(ex: ReferenceExecutor, prompt: list[int], feed: list[int], pages: list[int]) -> torch.Tensor:
    """Logits after the prompt, then after each token of `feed` (one decode step each): [1 + len(feed), vocab]."""
    rows = [ex.forward(StepBatch(prompt, [0], [len(prompt)], [pages]))[0]]
    for i, tok in enumerate(feed):
        rows.append(ex.forward(StepBatch([tok], [len(prompt) + i], [1], [pages]))[0])
    return torch.stack(rows)


def test_logits_match_transformers_fp32(hf_model):
    path, model = hf_model
    ex = make_executor(path)
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (40,)).tolist()  # 24-token prompt + 16 decode steps
    pages = torch.randperm(64)[:10].tolist()
    ours = run_prefill_decode(ex, ids[:24], ids[24:], pages)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0, 23:]
    assert rel_err(ours, theirs) < 1e-4


def test_greedy_tokens_match_transformers(hf_model):
    path, model = hf_model
    ex = make_executor(path)
    prompt = torch.randint(0, 300, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    pages = list(range(12))
    tokens = [int(ex.forward(StepBatch(prompt, [0], [7], [pages]))[0].argmax())]
    for i in range(31):
        tokens.append(int(ex.forward(StepBatch([tokens[-1]], [7 + i], [1], [pages]))[0].argmax()))
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert tokens == expected[0, 7:].tolist()


def test_bf16_error_is_that_of_plain_bf16_pytorch(hf_model):
    """Our bf16 run may err versus fp32 no more than transformers' own bf16 run does."""
    path, model = hf_model
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        exact = model(torch.tensor([ids])).logits[0, 15:]
        hf_bf16 = model.to(torch.bfloat16)(torch.tensor([ids])).logits[0, 15:].float()
    ours = run_prefill_decode(make_executor(path, torch.bfloat16), ids[:16], ids[16:], list(range(8)))
    assert rel_err(ours, exact) <= 1.5 * rel_err(hf_bf16, exact) + 1e-3


@pytest.mark.parametrize("case", ["llama-llama3rope-tied-bias"])
def test_shuffled_pages_equal_contiguous(tmp_path, case):
    from conftest import make_hf_model

    path, _ = make_hf_model(tmp_path, case)
    ids = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    contiguous = run_prefill_decode(make_executor(path), ids[:21], ids[21:], list(range(8)))
    shuffled = run_prefill_decode(make_executor(path), ids[:21], ids[21:], torch.randperm(64)[:8].tolist())
    torch.testing.assert_close(shuffled, contiguous, rtol=0, atol=1e-5)


def test_batch_of_variable_prompts_equals_each_alone(tmp_path):
    from conftest import make_hf_model

    path, _ = make_hf_model(tmp_path, "qwen2")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 13, 8, 1)]
    tables = [list(range(i * 10, i * 10 + 10)) for i in range(4)]

    alone = [
        make_executor(path).forward(StepBatch(p, [0], [len(p)], [t]))[0] for p, t in zip(prompts, tables, strict=True)
    ]
    ex = make_executor(path)
    batched = ex.forward(StepBatch([t for p in prompts for t in p], [0] * 4, [len(p) for p in prompts], tables))
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-5)

    # A mixed step: two sequences decode while another prefills a second chunk.
    nxt = [int(r.argmax()) for r in batched]
    mixed = ex.forward(StepBatch([nxt[0], nxt[1], 7, 8, 9], [3, 13, 8], [1, 1, 3], tables[:3]))
    solo = make_executor(path)
    solo.forward(StepBatch(prompts[2], [0], [8], [tables[2]]))
    torch.testing.assert_close(
        mixed[2], solo.forward(StepBatch([7, 8, 9], [8], [3], [tables[2]]))[0], rtol=1e-5, atol=1e-5
    )


def test_chunked_prefill_equals_whole_prefill(tmp_path):
    from conftest import make_hf_model

    path, _ = make_hf_model(tmp_path, "qwen3-headdim24")
    ids = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(6)).tolist()
    whole = make_executor(path).forward(StepBatch(ids, [0], [23], [list(range(6))]))
    ex = make_executor(path)
    for start, end in [(0, 5), (5, 16), (16, 23)]:
        last = ex.forward(StepBatch(ids[start:end], [start], [end - start], [list(range(6))]))
    torch.testing.assert_close(last, whole, rtol=1e-5, atol=1e-5)
