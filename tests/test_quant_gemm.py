"""The Triton GEMM and one-pass dequantization for quantized weights (kernels/quant_gemm.py) against the
dequantized matrices and quant/cpu.py: under the interpreter on CPU (tiny shapes), on CUDA when present.
Shapes leave partial tiles along N, K (where the format allows) and M; new tensors start as NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatier.kernels.quant_gemm import dequantize_matrix, quant_matmul
from megatier.quant import cpu
from megatier.quant.blocks import QuantWeight, from_gguf, quantize_fp8
from test_kernels import DEVICE, poison_new_tensors  # noqa: F401  (poison_new_tensors: autouse)
from test_quant import gguf_dequantized, random_blocks

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")  # interpreter noise


def matrix(kind: str, n: int, k: int) -> tuple[QuantWeight, torch.Tensor]:
    if kind == "FP8":
        w = quantize_fp8(torch.randn(n, k, generator=torch.Generator().manual_seed(4)))
        return w, w.dequantize()
    data = random_blocks(kind, n, k, seed=5)
    return from_gguf(kind, data, (n, k), "t"), gguf_dequantized(kind, data)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "FP8"])
@pytest.mark.parametrize("rows", [1, 3])
def test_quant_matmul_equals_the_dequantized_matmul(kind, rows):
    n, k = 40, 512 if kind == "Q4_K" else 352  # 352: the last K tile half full
    w, full = matrix(kind, n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(6))
    ours = quant_matmul(x.to(DEVICE), w.to(DEVICE)).cpu()
    theirs = F.linear(x.double(), full.double())
    assert ours.shape == (rows, n)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-6
    assert torch.allclose(ours, cpu.linear(x, w), rtol=1e-5, atol=1e-5)


def test_every_finite_fp8_code_decodes_exactly():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[~codes.view(torch.float8_e4m3fn).float().isnan()]
    q = codes[:224].reshape(7, 32).view(torch.float8_e4m3fn)  # 254 finite codes; 224 of them, 32 a row
    w = QuantWeight("FP8", (7, 32), {"q": q, "scale": torch.ones(7)})
    eye = torch.eye(32)
    assert torch.equal(quant_matmul(eye.to(DEVICE), w.to(DEVICE)).cpu().T, q.float())


def test_bf16_activations_come_back_in_bf16():
    w, full = matrix("Q4_1", 24, 64)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
    out = quant_matmul(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), F.linear(x.float(), full), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "FP8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matrix_writes_the_dequantized_values(kind, dtype):
    """Every element (N and K not multiples of the kernel's tiles): exact in fp32, within one bf16 step
    in bf16 (the interpreter truncates where a GPU rounds)."""
    w, full = matrix(kind, 37, 512 if kind == "Q4_K" else 288)
    out = dequantize_matrix(w.to(DEVICE), dtype).cpu()
    assert out.dtype == dtype and out.shape == full.shape
    if dtype == torch.float32:
        assert torch.equal(out, full)
    else:
        assert torch.allclose(out.float(), full, rtol=2**-7, atol=0)
