"""Every Triton kernel against plain PyTorch, on CPU under the Triton interpreter (and on CUDA when present).

Inputs are fresh random numbers; every float tensor the kernels allocate starts as NaN, so an output
element a kernel forgets to write fails the comparison. KV pages a kernel must not read hold NaN too.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatier.executors.reference import apply_rope, attention, rms_norm
from megatier.kernels import (
    add_rms_norm,
    merge_attention_states,
    merge_attention_states_reference,
    paged_decode_attention,
    paged_prefill_attention,
    rope_append,
    rope_cos_sin_table,
    silu_mul,
)
from megatier.kernels.copy_slices import copy_slices, swap_slices
from megatier.kv.pages import block_table_tensor, pages_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")  # interpreter noise

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poison_new_tensors(monkeypatch):
    """Float tensors from torch.empty / empty_like start as NaN for the whole test."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1.5e-2


class PagedKV:
    """A random cache whose pages are handed out in shuffled order; pages no sequence owns and rows past
    each sequence's end are NaN, so reading them poisons the result."""

    def __init__(self, seq_lens, num_kv_heads, head_dim, page_size, dtype, num_layers=2, spare_pages=3, seed=0):
        gen = torch.Generator().manual_seed(seed)
        needed = [pages_for(n, page_size) for n in seq_lens]
        num_pages = sum(needed) + spare_pages
        order = torch.randperm(num_pages, generator=gen).tolist()
        self.tables, taken = [], 0
        for n in needed:
            self.tables.append(order[taken : taken + n])
            taken += n
        shape = (num_pages, num_layers, 2, num_kv_heads, page_size, head_dim)
        self.kv = torch.full(shape, float("nan"), dtype=dtype)
        for table, n in zip(self.tables, seq_lens, strict=True):
            for j, page in enumerate(table):
                rows = min(page_size, n - j * page_size)
                self.kv[page, :, :, :, :rows] = torch.randn(num_layers, 2, num_kv_heads, rows, head_dim, generator=gen)
        self.kv = self.kv.to(DEVICE)
        self.page_size = page_size
        # Pad every table with a few extra entries of page 0 (never read) to test the row stride.
        self.block_tables = block_table_tensor([[*t, 0, 0] for t in self.tables], DEVICE)

    def keys_values(self, layer: int, seq: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [n, kv_heads, D] of the first n tokens of sequence `seq`."""
        pages = torch.tensor(self.tables[seq], dtype=torch.long, device=DEVICE)
        kv = self.kv[pages, layer].permute(1, 0, 3, 2, 4).reshape(2, -1, self.kv.shape[3], self.kv.shape[5])
        return kv[0, :n], kv[1, :n]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q [H, D] over all n keys k, v [n, Hkv, D] in fp64: (out [H, D], lse [H])."""
    heads, kv_heads = q.shape[0], k.shape[1]
    if k.shape[0] == 0:
        return torch.zeros_like(q, dtype=torch.float64), torch.full((heads,), float("-inf"), dtype=torch.float64)
    k = k.double().repeat_interleave(heads // kv_heads, dim=1)
    v = v.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.double(), k) * scale
    return torch.einsum("hn,nhd->hd", scores.softmax(-1), v), scores.logsumexp(-1)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,page_size,dtype",
    [
        (4, 2, 32, 4, torch.float32),  # GQA
        (4, 1, 24, 8, torch.float32),  # MQA, head_dim padded to 32
        (2, 2, 64, 16, torch.float32),  # MHA
        (8, 2, 16, 8, torch.bfloat16),
    ],
)
def test_paged_decode_attention(num_heads, num_kv_heads, head_dim, page_size, dtype):
    rng = random.Random(head_dim * 31 + page_size)
    seq_lens = [0, 1, page_size, 3 * page_size + 1, rng.randint(2, 40), rng.randint(2, 40)]
    cache = PagedKV(seq_lens, num_kv_heads, head_dim, page_size, dtype, seed=head_dim)
    q = torch.randn(len(seq_lens), num_heads, head_dim).to(DEVICE, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    for num_splits in (1, rng.randint(2, 4), 7):
        out, lse = paged_decode_attention(q, cache.kv, 1, cache.block_tables, lens, num_splits, scale)
        assert out.dtype == dtype and lse.dtype == torch.float32
        for b, n in enumerate(seq_lens):
            ref_out, ref_lse = dense_attention(q[b], *cache.keys_values(1, b, n), scale)
            assert rel_err(out[b], ref_out) < tol(dtype) or n == 0, (num_splits, b, n)
            if n == 0:
                assert torch.equal(out[b].float().cpu(), torch.zeros(num_heads, head_dim))
                assert torch.isneginf(lse[b]).all()
            else:
                torch.testing.assert_close(lse[b].double(), ref_lse, rtol=1e-5, atol=tol(dtype))


def test_decode_attention_on_page_subsets_merges_to_the_whole():
    """The tiered-KV use: two calls over disjoint page subsets of the same sequences, merged exactly."""
    page_size, seq_lens = 4, [13, 9, 4]
    cache = PagedKV(seq_lens, 2, 16, page_size, torch.float32)
    q = torch.randn(3, 4, 16, device=DEVICE)
    whole, whole_lse = paged_decode_attention(
        q, cache.kv, 0, cache.block_tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), 2, 0.25
    )
    # Subset A: the first page of each sequence (full). Subset B: the remaining pages, the last partial.
    first = block_table_tensor([t[:1] for t in cache.tables], DEVICE)
    rest = block_table_tensor([t[1:] for t in cache.tables], DEVICE)
    lens_a = torch.tensor([page_size] * 3, dtype=torch.int32, device=DEVICE)
    lens_b = torch.tensor([n - page_size for n in seq_lens], dtype=torch.int32, device=DEVICE)
    out_a, lse_a = paged_decode_attention(q, cache.kv, 0, first, lens_a, 1, 0.25)
    out_b, lse_b = paged_decode_attention(q, cache.kv, 0, rest, lens_b, 3, 0.25)
    merged, merged_lse = merge_attention_states(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))
    torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, whole_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_attention_states_equals_softmax_over_the_union(dtype):
    gen = torch.Generator().manual_seed(3)
    rows, head_dim, num_keys = 6, 24, 40
    q = torch.randn(rows, head_dim, generator=gen)
    k = torch.randn(num_keys, head_dim, generator=gen)
    v = torch.randn(num_keys, head_dim, generator=gen)
    scores = q @ k.T
    # Five partials over a random partition of the keys; partial 2 is empty for every row, and row 0 has
    # keys in partial 4 only.
    owner = torch.randint(0, 5, (rows, num_keys), generator=gen)
    owner[owner == 2] = 3
    owner[0] = 4
    outs, lses = [], []
    for part in range(5):
        s = scores.masked_fill(owner != part, float("-inf"))
        lse = s.logsumexp(-1)
        out = torch.nan_to_num(s.softmax(-1)) @ v
        outs.append(torch.where(lse.isneginf()[:, None], float("nan"), out))  # never read when empty
        lses.append(lse)
    outs_t = torch.stack(outs).to(DEVICE, dtype)
    lses_t = torch.stack(lses).to(DEVICE)
    out, lse = merge_attention_states(outs_t, lses_t)
    dense_out, dense_lse = scores.softmax(-1) @ v, scores.logsumexp(-1)
    assert out.dtype == dtype
    assert rel_err(out, dense_out) < tol(dtype)
    torch.testing.assert_close(lse.cpu(), dense_lse, rtol=1e-5, atol=1e-5)
    ref_out, ref_lse = merge_attention_states_reference(outs_t, lses_t)
    assert rel_err(ref_out, dense_out) < tol(dtype)
    torch.testing.assert_close(ref_lse.cpu(), dense_lse, rtol=1e-5, atol=1e-5)


def test_merge_attention_states_all_empty_rows_and_extra_dims():
    outs = torch.randn(3, 2, 5, 8, device=DEVICE)
    lses = torch.randn(3, 2, 5, device=DEVICE)
    lses[:, 1, 3] = float("-inf")
    out, lse = merge_attention_states(outs, lses, out_dtype=torch.bfloat16)
    assert out.shape == (2, 5, 8) and out.dtype == torch.bfloat16 and lse.shape == (2, 5)
    assert torch.equal(out[1, 3].float().cpu(), torch.zeros(8)) and torch.isneginf(lse[1, 3])
    ref_out, ref_lse = merge_attention_states_reference(outs, lses)
    assert rel_err(out, ref_out) < tol(torch.bfloat16)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,page_size,dtype",
    [(4, 2, 32, 4, torch.float32), (4, 1, 24, 8, torch.float32), (4, 2, 16, 8, torch.bfloat16)],
)
def test_paged_prefill_attention(num_heads, num_kv_heads, head_dim, page_size, dtype):
    # (start, query_len): a first chunk, a later chunk of a long prompt, a decode token, a one-token prompt.
    spans = [(0, 21), (11, 19), (30, 1), (0, 1)]
    seq_lens = [s + n for s, n in spans]
    cache = PagedKV(seq_lens, num_kv_heads, head_dim, page_size, dtype, seed=head_dim + 1)
    num_tokens = sum(n for _, n in spans)
    q = torch.randn(num_tokens, num_heads, head_dim).to(DEVICE, dtype)
    starts, query_lens = [s for s, _ in spans], [n for _, n in spans]
    out = paged_prefill_attention(q, cache.kv, 1, cache.block_tables, starts, query_lens, head_dim**-0.5)
    offset = 0
    for b, (start, n) in enumerate(spans):
        k, v = cache.keys_values(1, b, start + n)
        ref = attention(q[offset : offset + n].double(), k.double(), v.double(), start)
        assert rel_err(out[offset : offset + n], ref) < tol(dtype), b
        offset += n


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("head_dim,dtype", [(16, torch.float32), (24, torch.float32), (32, torch.bfloat16)])
def test_rope_append(qk_norm, head_dim, dtype):
    num_heads, num_kv_heads, page_size, eps = 4, 2, 4, 1e-6
    gen = torch.Generator().manual_seed(head_dim)
    # Two sequences: a 6-token chunk from position 3 and one decode token at position 9; the third row
    # is a padding token (position -1) that must write nothing.
    tables = [[5, 1, 3], [0, 4, 2]]
    positions = [3, 4, 5, 6, 7, 8, 9, -1]
    seq_ids = [0, 0, 0, 0, 0, 0, 1, 1]
    num_tokens = len(positions)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q_norm = torch.rand(head_dim, generator=gen).add(0.5).to(DEVICE, dtype) if qk_norm else None
    k_norm = torch.rand(head_dim, generator=gen).add(0.5).to(DEVICE, dtype) if qk_norm else None
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos_sin = rope_cos_sin_table(inv_freq, 16).to(DEVICE)
    kv = torch.full((6, 2, 2, num_kv_heads, page_size, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    q = rope_append(
        qkv,
        torch.tensor(positions, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_ids, dtype=torch.int32, device=DEVICE),
        block_table_tensor(tables, DEVICE),
        kv,
        1,
        cos_sin,
        num_heads,
        q_norm,
        k_norm,
        eps,
    )

    # Reference: fp32 arithmetic of the reference executor.
    x = qkv.float()
    ref_q = x[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    ref_k = x[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, -1)
    if qk_norm:
        ref_q, ref_k = rms_norm(ref_q, q_norm.float(), eps), rms_norm(ref_k, k_norm.float(), eps)
    pos = torch.tensor(positions, device=DEVICE).clamp_min(0)
    cos, sin = cos_sin[pos].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    ref_q, ref_k = apply_rope(ref_q, cos, sin), apply_rope(ref_k, cos, sin)
    assert rel_err(q, ref_q) < tol(dtype)
    written = torch.zeros(kv.shape[:2] + kv.shape[3:5], dtype=torch.bool)
    for t, (p, s) in enumerate(zip(positions, seq_ids, strict=True)):
        if p < 0:
            continue
        page, row = tables[s][p // page_size], p % page_size
        written[page, 1, :, row] = True
        assert rel_err(kv[page, 1, 0, :, row], ref_k[t]) < tol(dtype)
        v = qkv[t, (num_heads + num_kv_heads) * head_dim :].view(num_kv_heads, head_dim)
        assert torch.equal(kv[page, 1, 1, :, row], v)
    untouched = kv.permute(0, 1, 3, 4, 2, 5)[~written.to(DEVICE)]
    assert torch.isnan(untouched.float()).all()


def test_rope_cos_sin_table_matches_reference_rope():
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    table = rope_cos_sin_table(inv_freq, 5000)
    freqs = torch.arange(5000).float()[:, None] * inv_freq[None, :]
    assert torch.equal(table, torch.cat((freqs.cos(), freqs.sin()), -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 80])
def test_add_rms_norm(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(5, hidden, generator=gen).to(DEVICE)
    weight = torch.rand(hidden, generator=gen).add(0.5).to(DEVICE, dtype)
    expected_residual = residual + x.float()
    out = add_rms_norm(x, residual, weight, 1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)
    assert rel_err(out, rms_norm(expected_residual, weight.float(), 1e-5)) < tol(dtype) / 2

    out = add_rms_norm(x, residual, weight, 1e-5, add=False)
    torch.testing.assert_close(residual, x.float(), rtol=0, atol=0)
    assert rel_err(out, rms_norm(x.float(), weight.float(), 1e-5)) < tol(dtype) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    gate_up = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = silu_mul(gate_up)
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert out.shape == (3, 1500) and out.dtype == dtype
    assert rel_err(out, F.silu(gate) * up) < tol(dtype) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_and_swap_slices_between_a_device_and_a_host_pool(dtype):
    """Scattered slices of an odd word count (a tail past the kernel's block) between the device pool
    and a host pool (pinned on CUDA, read and written over PCIe); slices not named stay untouched."""
    gen = torch.Generator().manual_seed(5)
    shape = (1, 2, 3, 4, 1100)  # 26400 elements: 13200 int32 words, not a multiple of the block
    dev = torch.randn(7, *shape, generator=gen).to(dtype).to(DEVICE)
    host = torch.randn(9, *shape, generator=gen).to(dtype)
    if DEVICE.type == "cuda":
        host = host.pin_memory()
    dev0, host0 = dev.clone(), host.clone()
    idx = torch.tensor([[4, 0, 6], [8, 2, 5]], dtype=torch.int32, device=DEVICE)
    swap_slices(dev, host, idx[0], idx[1], kernel=True)
    copy_slices(host, dev, idx[1, :2], torch.tensor([1, 3], dtype=torch.int32, device=DEVICE), kernel=True)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    want_dev, want_host = dev0.clone(), host0.clone()
    want_dev[[4, 0, 6]], want_host[[8, 2, 5]] = host0[[8, 2, 5]].to(DEVICE), dev0[[4, 0, 6]].cpu()
    want_dev[[1, 3]] = want_host[[8, 2]].to(DEVICE)
    assert torch.equal(dev, want_dev)
    assert torch.equal(host, want_host)
    with pytest.raises(ValueError, match="pools differ"):
        swap_slices(dev, host.double(), idx[0], idx[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test above compiles the kernels for real")
def test_kernels_compile_for_hopper():
    """The interpreter accepts code that Triton's compiler rejects; compile every kernel for sm_90."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "compile_kernels_sm90.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 2, 32), (9, 3, 20), (4, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_scores_equal_the_torch_bound(num_heads, num_kv_heads, head_dim, dtype):
    """The fused scorer against PageMeta.score's torch form: random min <= max metadata, tables with
    repeated pages and a width past the kernel's block, rows with no, some and all columns real."""
    from megatier.kernels.page_scores import page_scores
    from megatier.kv.locality import PageMeta

    gen = torch.Generator().manual_seed(11)
    pages, layers, rows, width = 50, 3, 4, 45
    meta = PageMeta(pages, layers, num_kv_heads, head_dim, dtype, torch.device("cpu"))
    bounds = torch.randn(pages + 1, layers, num_kv_heads, 2, head_dim, generator=gen).sort(dim=3).values
    meta.minmax.copy_(bounds.to(dtype))
    q = torch.randn(rows, num_heads, head_dim, generator=gen).to(dtype)
    tables = torch.randint(0, pages, (rows, width), generator=gen)
    num_pages = torch.tensor([0, 7, width, 33])
    want = meta.score(1, q, tables, num_pages, 0.3)
    got = page_scores(q.to(DEVICE), meta.minmax[:, 1].to(DEVICE), tables.to(DEVICE), num_pages.to(DEVICE), 0.3)
    real = torch.arange(width)[None, :] < num_pages[:, None]
    assert torch.isneginf(got.cpu()[~real]).all()
    torch.testing.assert_close(got.cpu()[real], want[real], rtol=1e-5, atol=1e-5)
    assert want[real].std() > 0.1  # scores that differ: an order is there to be kept
