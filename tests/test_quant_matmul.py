"""The C quantized matmul kernel (quant/quant_matmul.c) against gguf's own dequantization in float64:
every block type and every SIMD variant this CPU runs (the scalar one included), odd output counts, 1 to
16 rows of x, random non-zero inputs; the quant/cpu.py dispatch; what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from megatier import MegatierError
from megatier.quant import cmatmul, cpu
from megatier.quant.blocks import GGUF_BLOCKS, from_gguf, quantize_fp8

pytestmark = pytest.mark.skipif(cmatmul.load_library() is None, reason="no C compiler")
KINDS = [*sorted(GGUF_BLOCKS), "FP8"]


def random_weight(kind: str, n: int, k: int, seed: int):
    """(QuantWeight, its float64 matrix by gguf.quants.dequantize): random block bytes (every bit pattern of
    the quants and Q4_K's packed scales) with finite non-zero fp16 scales; FP8 from a random matrix."""
    rng = np.random.default_rng(seed)
    if kind == "FP8":
        w = quantize_fp8(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)))
        return w, w.dequantize().double()
    block, size = GGUF_BLOCKS[kind]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    halves = 2 if kind in ("Q4_1", "Q4_K") else 1
    scales = rng.uniform(0.005, 0.05, (n, k // block, halves)) * rng.choice([-1, 1], (n, k // block, halves))
    raw[:, :, : 2 * halves] = scales.astype(np.float16).view(np.uint8).reshape(n, k // block, 2 * halves)
    data = raw.reshape(n, k // block * size)
    full = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[kind])).double()
    return from_gguf(kind, data, (n, k), "t"), full


def check(y: torch.Tensor, x: torch.Tensor, full: torch.Tensor) -> None:
    """Within fp32 rounding of the float64 product: 1e-5 of sum |x| |w| per output (a relative bound that
    cancellation cannot break), and finite."""
    want = x.double() @ full.T
    bound = x.double().abs() @ full.abs().T
    assert y.dtype == torch.float32 and y.shape == want.shape and torch.isfinite(y).all()
    err = float(((y.double() - want).abs() / bound).max())
    assert err < 1e-5, err


@pytest.mark.parametrize("isa", cmatmul.ISAS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n", [1, 37])
def test_every_variant_matches_ggufs_dequantization(isa, kind, m, n):
    if isa not in cmatmul.supported_isas():
        pytest.skip(f"this CPU lacks {isa}")
    k = 512
    w, full = random_weight(kind, n, k, seed=n + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) + 0.1
    before = cmatmul.CALLS[isa]
    check(cmatmul.matmul(x, w, isa=isa, threads=2), x, full)
    assert cmatmul.CALLS[isa] == before + 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_split_over_threads_and_row_views(kind, threads):
    w, full = random_weight(kind, 203, 256 * 3, seed=7)
    x = torch.randn(5, 256 * 3, generator=torch.Generator().manual_seed(2))
    check(cmatmul.matmul(x, w, threads=threads), x, full)
    part = w.rows(17, 120)  # a view: the planes start mid-matrix
    check(cmatmul.matmul(x, part, threads=threads), x, full[17:120])


def test_cpu_linear_takes_the_c_kernel_for_few_rows_only():
    w, full = random_weight("Q4_1", 33, 256, seed=1)
    gen = torch.Generator().manual_seed(3)
    for rows, c_calls in ((cpu.C_MAX_ROWS, 1), (cpu.C_MAX_ROWS + 1, 0)):
        x = torch.randn(1, rows, 256, generator=gen)
        before = sum(cmatmul.CALLS.values())
        y = cpu.linear(x, w)
        assert sum(cmatmul.CALLS.values()) == before + c_calls
        check(y[0], x[0], full)
    assert cpu.linear(x.bfloat16()[:, :2], w).dtype == torch.bfloat16


def test_a_weight_whose_plane_was_replaced_is_read_anew():
    w, _ = random_weight("Q8_0", 9, 64, seed=4)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    cmatmul.matmul(x, w)
    other, full = random_weight("Q8_0", 9, 64, seed=6)
    w.planes["q"], w.planes["d"] = other.planes["q"], other.planes["d"]
    check(cmatmul.matmul(x, w), x, full)


def test_refusals():
    w, _ = random_weight("Q4_0", 4, 64, seed=0)
    with pytest.raises(ValueError, match="fp32 host tensor"):
        cmatmul.matmul(torch.randn(2, 32), w)
    with pytest.raises(ValueError, match="fp32 host tensor"):
        cmatmul.matmul(torch.randn(2, 64, dtype=torch.float64), w)
    with pytest.raises(MegatierError, match="unknown quantized matmul isa"):
        cmatmul.matmul(torch.randn(1, 64), w, isa="sse9")
    strided = from_gguf("Q4_0", np.zeros((4, 36), np.uint8), (4, 64), "t")
    strided.planes["q"] = strided.planes["q"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not cmatmul.usable(strided)  # so cpu.linear keeps its torch path


def test_an_isa_this_cpu_lacks_is_refused_in_one_line(monkeypatch):
    lib = cmatmul.load_library()
    monkeypatch.setattr(lib, "isa_supported", lambda isa: int(isa == 0))  # a CPU with no SIMD
    w, _ = random_weight("Q8_0", 4, 64, seed=0)
    with pytest.raises(MegatierError, match=r"cannot run the avx2 quantized matmul kernel \(it runs scalar\)"):
        cmatmul.matmul(torch.randn(1, 64), w, isa="avx2")


def _fresh_library(monkeypatch):
    monkeypatch.setattr(cmatmul, "_lib", None)
    monkeypatch.setattr(cmatmul, "_lib_error", None)


def test_without_a_compiler_linear_keeps_its_torch_path(monkeypatch, caplog, tmp_path):
    _fresh_library(monkeypatch)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MEGATIER_CACHE_DIR", str(tmp_path))
    with caplog.at_level("WARNING"):
        assert cmatmul.load_library() is None
    assert "no C compiler found; using the torch implementation" in caplog.text
    w, full = random_weight("Q4_1", 5, 64, seed=1)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    before = sum(cmatmul.CALLS.values())
    check(cpu.linear(x, w), x, full)
    assert sum(cmatmul.CALLS.values()) == before
    with pytest.raises(MegatierError, match="unavailable: no C compiler found"):
        cmatmul.matmul(x, w)


def test_the_thread_pool_build_without_openmp(monkeypatch, tmp_path):
    """Where the compiler has no OpenMP the kernel runs on threadpool.h's pool, the caller as worker 0."""
    _fresh_library(monkeypatch)
    monkeypatch.setenv("MEGATIER_CACHE_DIR", str(tmp_path))
    build = cmatmul.cbuild.build
    monkeypatch.setattr(
        cmatmul.cbuild,
        "build",
        lambda name, src, flags=cmatmul.cbuild.FLAGS: (
            build(name, src, flags) if "-fopenmp" not in flags else (None, "no OpenMP")
        ),
    )
    lib = cmatmul.load_library()
    assert lib is not None and not any(p.suffix == ".tmp" for p in tmp_path.rglob("*"))
    for kind in ("Q4_K", "FP8"):
        w, full = random_weight(kind, 77, 512, seed=2)
        x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))
        for threads in (1, 2, 3):
            check(cmatmul.matmul(x, w, threads=threads), x, full)
