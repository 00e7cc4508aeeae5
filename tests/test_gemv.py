"""The fused decode GEMV kernels (gemv.py, gemv_qkv.py, argmax.py, embed.py) against plain PyTorch, on
plain weights and on quantized ones (FP8 and the GGUF kinds, against their dequantized values).

Under the Triton interpreter on CPU (tiny shapes), on CUDA when present. Inputs are fresh random
numbers; tensors the kernels allocate start as NaN (the poison fixture), KV pages nobody may write hold
NaN, and residual rows a kernel must update are checked element by element. Batch sizes cover the FMA
path (one row) and the tensor-core path (rows padded to 16); shapes are not multiples of the blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatier.executors.reference import apply_rope, rms_norm
from megatier.kernels import gemv
from megatier.kernels.argmax import greedy_feedback
from megatier.kernels.embed import embed_rows
from megatier.kernels.gemv import GemvConfig, gemv_norm_logits, gemv_norm_silu, gemv_residual_add
from megatier.kernels.gemv_qkv import gemv_qkv_rope
from megatier.kernels.rope import rope_cos_sin_table
from megatier.kv.pages import block_table_tensor
from megatier.quant.blocks import QuantWeight, from_gguf, quantize_fp8
from test_kernels import DEVICE, poison_new_tensors, rel_err, tol  # noqa: F401  (poison_new_tensors: autouse)
from test_quant import gguf_dequantized, random_blocks

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")  # interpreter noise

ROWS = [1, 3]  # the FMA path and the dot path (padded to 16)


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def weight(n: int, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return randn(n, k, gen=gen, dtype=dtype, scale=k**-0.5)


def normed(residual: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(residual.double(), norm.double(), eps)


@pytest.fixture(params=[None, GemvConfig(16, 32, 4, 2)], ids=["default", "small-blocks"])
def config(request, monkeypatch):
    """The default configurations, and one that forces several K iterations and partial blocks."""
    if request.param is not None:
        monkeypatch.setattr(gemv, "gemv_config", lambda *a: request.param)
        monkeypatch.setattr("megatier.kernels.gemv_qkv.gemv_config", lambda *a: request.param)
    return request.param


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_gemv_residual_add(rows, dtype, bias, config):
    gen = torch.Generator().manual_seed(rows)
    n, k = 72, 96
    x, w = randn(rows, k, gen=gen, dtype=dtype), weight(n, k, gen, dtype)
    b = randn(n, gen=gen, dtype=dtype) if bias else None
    residual = randn(rows, n, gen=gen)
    expected = residual.double() + x.double() @ w.double().T + (b.double() if bias else 0)
    gemv_residual_add(x, w, b, residual)
    assert rel_err(residual, expected) < tol(dtype) / 4


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_gemv_norm_silu(rows, dtype, bias, config):
    gen = torch.Generator().manual_seed(10 + rows)
    width, k, eps = 40, 80, 1e-5
    residual, norm = randn(rows, k, gen=gen, scale=3.0), randn(k, gen=gen, dtype=dtype).abs() + 0.5
    w = weight(2 * width, k, gen, dtype)
    b = randn(2 * width, gen=gen, dtype=dtype, scale=0.1) if bias else None
    out = gemv_norm_silu(residual, norm, w, b, eps)
    h = normed(residual, norm, eps) @ w.double().T + (b.double() if bias else 0)
    gate, up = h.chunk(2, dim=-1)
    assert out.shape == (rows, width) and out.dtype == dtype
    assert rel_err(out, F.silu(gate) * up) < tol(dtype)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_norm_logits_and_argmax(rows, dtype, config):
    gen = torch.Generator().manual_seed(20 + rows)
    vocab, k, eps = 300, 64, 1e-6
    residual, norm = randn(rows, k, gen=gen), randn(k, gen=gen, dtype=dtype).abs() + 0.5
    w = weight(vocab, k, gen, dtype)
    # Row 0's two largest logits tie after rounding to the weight dtype: the lower index must win.
    w[250] = w[7]
    expected = normed(residual, norm, eps) @ w.double().T
    logits, parts = gemv_norm_logits(residual, norm, w, eps, logits=True, argmax=True)
    assert logits.dtype == torch.float32 and logits.shape == (rows, vocab)
    assert rel_err(logits, expected) < tol(dtype)

    tokens = torch.full((rows,), -5, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([7, 0, 3][:rows], dtype=torch.int32, device=DEVICE)
    history = torch.full((4, rows + 2), -1, dtype=torch.int64, device=DEVICE)
    step = torch.tensor([2], dtype=torch.int64, device=DEVICE)
    greedy_feedback(*parts, tokens, seq_lens, history, step, vocab)
    # The kernel's own logits rounded to the dtype, first index of the maximum.
    chosen = logits.to(dtype).float().argmax(-1).to(torch.int32)
    assert torch.equal(tokens, chosen)
    assert torch.equal(history[2, :rows], chosen.long()) and (history[[0, 1, 3]] == -1).all()
    assert (history[2, rows:] == -1).all()
    assert seq_lens.tolist() == [8, 0, 4][:rows] and step.item() == 3


def test_greedy_feedback_ties_and_empty_partials():
    """Partials from programs with equal maxima give the lowest index; empty partials never win."""
    part_val = torch.tensor([[1.0, 3.0, 3.0, float("-inf")], [2.0, -1.0, 2.0, 0.5]], device=DEVICE)
    part_idx = torch.tensor([[0, 42, 17, 300], [5, 9, 3, 11]], dtype=torch.int32, device=DEVICE)
    tokens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([1, 5], dtype=torch.int32, device=DEVICE)
    history = torch.zeros((1, 2), dtype=torch.int64, device=DEVICE)
    step = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    greedy_feedback(part_val, part_idx, tokens, seq_lens, history, step, 300)
    assert tokens.tolist() == [17, 3] and history.tolist() == [[17, 3]] and seq_lens.tolist() == [2, 6]


def test_embed_rows():
    gen = torch.Generator().manual_seed(3)
    table = randn(50, 40, gen=gen, dtype=torch.bfloat16)
    tokens = torch.tensor([4, 49, 0, 4], dtype=torch.int32, device=DEVICE)
    out = embed_rows(tokens, table)
    assert out.dtype == torch.float32 and torch.equal(out, table[tokens.long()].float())


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(
    "head_dim,qk_norm,bias,dtype",
    [(16, False, True, torch.float32), (24, True, False, torch.float32), (32, False, False, torch.bfloat16)],
)
def test_gemv_qkv_rope(rows, head_dim, qk_norm, bias, dtype, config):
    gen = torch.Generator().manual_seed(head_dim + rows)
    hidden = 48
    w = weight((4 + 2 * 2) * head_dim, hidden, gen, dtype)
    check_qkv_rope(rows, head_dim, qk_norm, bias, dtype, hidden, w, w.double(), gen)


def check_qkv_rope(rows, head_dim, qk_norm, bias, dtype, hidden, w, w_exact, gen):
    """gemv_qkv_rope with weight w (w_exact: its values) against the normed, rotated products."""
    num_heads, num_kv_heads, page_size, eps = 4, 2, 4, 1e-6
    qkv_rows = (num_heads + 2 * num_kv_heads) * head_dim
    residual, norm = randn(rows, hidden, gen=gen, scale=2.0), randn(hidden, gen=gen, dtype=dtype).abs() + 0.5
    b = randn(qkv_rows, gen=gen, dtype=dtype, scale=0.1) if bias else None
    q_norm = randn(head_dim, gen=gen, dtype=dtype).abs() + 0.5 if qk_norm else None
    k_norm = randn(head_dim, gen=gen, dtype=dtype).abs() + 0.5 if qk_norm else None
    # Row 1 (when present) is a padding row: length 0, it must write no KV.
    lens = [10, 0, 6, *range(1, 14)][:rows]
    tables = [[5, 1, 3], [0, 4, 2], [2, 0, 4]][:rows]
    taken = {(3, 1), (0, 1)}  # rows 0 and 2 write there; no two rows may write one slot (lanes race on a GPU)
    for n in lens[3:]:
        slot = (n - 1) % page_size
        page = next(p for p in range(6) if (p, slot) not in taken)
        taken.add((page, slot))
        table = [(page + 1 + j) % 6 for j in range(4)]
        table[(n - 1) // page_size] = page
        tables.append(table)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos_sin = rope_cos_sin_table(inv_freq, 16).to(DEVICE)
    kv = torch.full((6, 2, 2, num_kv_heads, page_size, head_dim), float("nan"), dtype=dtype, device=DEVICE)

    q = gemv_qkv_rope(
        residual,
        norm,
        w,
        b,
        seq_lens,
        block_table_tensor(tables, DEVICE),
        kv,
        1,
        cos_sin,
        num_heads,
        q_norm,
        k_norm,
        eps,
    )

    qkv = normed(residual, norm, eps) @ w_exact.to(DEVICE).T + (b.double() if bias else 0)
    ref_q = qkv[:, : num_heads * head_dim].view(rows, num_heads, head_dim)
    ref_k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(rows, num_kv_heads, head_dim)
    ref_v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(rows, num_kv_heads, head_dim)
    if qk_norm:
        ref_q, ref_k = rms_norm(ref_q, q_norm.double(), eps), rms_norm(ref_k, k_norm.double(), eps)
    pos = (seq_lens - 1).clamp_min(0)
    cos, sin = cos_sin[pos].double().chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    ref_q, ref_k = apply_rope(ref_q, cos, sin), apply_rope(ref_k, cos, sin)
    assert q.shape == (rows, num_heads, head_dim) and q.dtype == dtype
    assert rel_err(q, ref_q) < tol(dtype)
    writer: dict[tuple[int, int], int] = {}
    for row, n in enumerate(lens):
        if n:
            writer[(tables[row][(n - 1) // page_size], (n - 1) % page_size)] = row
    assert len(writer) == sum(n > 0 for n in lens)
    written = torch.zeros(kv.shape[:2] + kv.shape[3:5], dtype=torch.bool)
    for (page, slot), row in writer.items():
        written[page, 1, :, slot] = True
        assert rel_err(kv[page, 1, 0, :, slot], ref_k[row]) < tol(dtype)
        assert rel_err(kv[page, 1, 1, :, slot], ref_v[row]) < tol(dtype)
    untouched = kv.permute(0, 1, 3, 4, 2, 5)[~written.to(DEVICE)]
    assert torch.isnan(untouched.float()).all()


# ---- quantized weights: blocks decoded in registers ----------------------------------------------------

QUANT_ROWS = [1, 3, 16]  # the FMA path, the dot path, the graph executor's largest fused bucket


def quant_weight(kind: str, n: int, k: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """A QuantWeight on DEVICE and its dequantized values (fp64): FP8 from random floats, GGUF kinds
    from random blocks."""
    if kind == "FP8":
        w = quantize_fp8(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k**-0.5)
        return w.to(DEVICE), w.dequantize().double()
    data = random_blocks(kind, n, k, seed=seed)
    return from_gguf(kind, data, (n, k), "t").to(DEVICE), gguf_dequantized(kind, data).double()


def quant_k(kind: str, k: int) -> int:
    """K rounded up to the kind's block (Q4_K: 256; the others 32; FP8 anything)."""
    block = 256 if kind == "Q4_K" else 1 if kind == "FP8" else 32
    return -(-k // block) * block


QUANT_CASES = [(kind, torch.float32) for kind in ("FP8", "Q8_0", "Q4_0", "Q4_1", "Q4_K")]
QUANT_CASES += [("FP8", torch.bfloat16), ("Q4_1", torch.bfloat16)]


@pytest.mark.parametrize("rows", QUANT_ROWS)
@pytest.mark.parametrize("kind,dtype", QUANT_CASES)
def test_quant_gemv_residual_add(rows, kind, dtype, config):
    gen = torch.Generator().manual_seed(30 + rows)
    n, k = 75, quant_k(kind, 97)
    w, exact = quant_weight(kind, n, k, seed=rows)
    x, b, residual = randn(rows, k, gen=gen, dtype=dtype), randn(n, gen=gen, dtype=dtype), randn(rows, n, gen=gen)
    expected = residual.double() + x.double() @ exact.to(DEVICE).T + b.double()
    gemv_residual_add(x, w, b, residual)
    assert rel_err(residual, expected) < tol(dtype) / 4


@pytest.mark.parametrize("rows", QUANT_ROWS)
@pytest.mark.parametrize("kind,dtype", QUANT_CASES)
def test_quant_gemv_norm_silu(rows, kind, dtype, config):
    gen = torch.Generator().manual_seed(40 + rows)
    width, k, eps = 37, quant_k(kind, 80), 1e-5
    w, exact = quant_weight(kind, 2 * width, k, seed=rows + 1)
    residual, norm = randn(rows, k, gen=gen, scale=3.0), randn(k, gen=gen, dtype=dtype).abs() + 0.5
    b = randn(2 * width, gen=gen, dtype=dtype, scale=0.1)
    out = gemv_norm_silu(residual, norm, w, b, eps)
    gate, up = (normed(residual, norm, eps) @ exact.to(DEVICE).T + b.double()).chunk(2, dim=-1)
    assert out.shape == (rows, width) and out.dtype == dtype
    assert rel_err(out, F.silu(gate) * up) < tol(dtype)


@pytest.mark.parametrize("rows", QUANT_ROWS)
@pytest.mark.parametrize("kind,dtype", QUANT_CASES)
def test_quant_gemv_norm_logits_and_argmax(rows, kind, dtype, config):
    gen = torch.Generator().manual_seed(50 + rows)
    vocab, k, eps = 301, quant_k(kind, 64), 1e-6
    w, exact = quant_weight(kind, vocab, k, seed=rows + 2)
    residual, norm = randn(rows, k, gen=gen), randn(k, gen=gen, dtype=dtype).abs() + 0.5
    logits, parts = gemv_norm_logits(residual, norm, w, eps, logits=True, argmax=True)
    assert logits.dtype == torch.float32 and logits.shape == (rows, vocab)
    assert rel_err(logits, normed(residual, norm, eps) @ exact.to(DEVICE).T) < tol(dtype)
    tokens = torch.full((rows,), -5, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.ones(rows, dtype=torch.int32, device=DEVICE)
    history = torch.full((1, rows), -1, dtype=torch.int64, device=DEVICE)
    greedy_feedback(*parts, tokens, seq_lens, history, torch.zeros(1, dtype=torch.int64, device=DEVICE), vocab)
    assert torch.equal(tokens, logits.to(dtype).float().argmax(-1).to(torch.int32))


@pytest.mark.parametrize("rows", QUANT_ROWS)
@pytest.mark.parametrize("kind,dtype", QUANT_CASES)
def test_quant_gemv_qkv_rope(rows, kind, dtype, config):
    gen = torch.Generator().manual_seed(60 + rows)
    head_dim, hidden = 16, quant_k(kind, 64)
    w, exact = quant_weight(kind, (4 + 2 * 2) * head_dim, hidden, seed=rows + 3)
    check_qkv_rope(rows, head_dim, kind == "Q4_1", True, dtype, hidden, w, exact, gen)


# ---- GPU: the Llama-3.2-1B shape in bf16 --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [1, 8])
def test_llama_1b_fused_decode_error_and_determinism(num_seqs):
    """Teacher-forced decode steps through the fused kernels (FMA path at 1 row, dot path at 8): the
    error versus fp32 stays within a plain bf16 run's, and a second executor gives bitwise the same
    logits. The cuBLAS path's error is printed alongside."""
    from megatier.executors.base import StepBatch
    from megatier.executors.graph import GraphExecutor
    from megatier.executors.reference import ReferenceExecutor
    from megatier.loader import dummy_weights
    from test_graph_executor import LLAMA_1B, llama_executor

    weights = dummy_weights(LLAMA_1B, 1, torch.bfloat16, torch.device("cuda"))
    gen = torch.Generator().manual_seed(13)
    prompt_lens, num_steps = [37 + 5 * i for i in range(num_seqs)], 6
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(num_seqs)]
    prompts = [torch.randint(0, LLAMA_1B.vocab_size, (n,), generator=gen).tolist() for n in prompt_lens]
    feeds = torch.randint(0, LLAMA_1B.vocab_size, (num_steps, num_seqs), generator=gen).tolist()
    steps = [StepBatch([t for p in prompts for t in p], [0] * num_seqs, prompt_lens, tables)]
    steps += [StepBatch(f, [n + i for n in prompt_lens], [1] * num_seqs, tables) for i, f in enumerate(feeds)]

    def run(cls, dtype, gemv_max_batch=16):
        ex = llama_executor(cls, weights, dtype)
        ex.gemv_max_batch = gemv_max_batch
        ex.forward(steps[0])  # the prompts
        return torch.cat([ex.forward(s) for s in steps[1:]])

    exact = run(ReferenceExecutor, torch.float32)
    plain = run(ReferenceExecutor, torch.bfloat16)
    fused, fused_again = run(GraphExecutor, torch.bfloat16), run(GraphExecutor, torch.bfloat16)
    cublas = run(GraphExecutor, torch.bfloat16, gemv_max_batch=0)
    errors = {name: rel_err(x, exact) for name, x in [("fused", fused), ("cublas", cublas), ("plain bf16", plain)]}
    print(f"Llama-1B decode logits rel. error vs fp32 at {num_seqs} rows: {errors}")
    assert errors["fused"] <= errors["plain bf16"]
    assert torch.equal(fused, fused_again)
