"""y = x @ W^T for a QuantWeight (quant/blocks.py) on the GPU: the blocks are read as stored and
dequantized in registers, so a step streams 0.56 (Q4_0), 0.63 (Q4_1), 1.06 (Q8_0) or 1 (FP8) byte per
weight instead of 2 (bf16).

A program owns BLOCK_N output features for BLOCK_M activation rows (padded to 16 for tensor-core dots)
and loops over K in BLOCK_K steps (a multiple of 32, so one Q4_K sub-block or Q4/Q8 block is never split
between a tile's halves). Each weight is rebuilt from its plane bytes exactly as `QuantWeight.dequantize`
computes it, then multiplied in fp32 (fp32 storage, and the interpreter) or in x's 16-bit dtype, always
accumulating in fp32. FP8 bytes are decoded by integer arithmetic (sign and 7 exponent/mantissa bits
moved into fp16's places: the code's value / 256, subnormals included, converted to a normal fp32, so
flushing fp32 subnormals cannot lose any), exact for every finite code and needing no FP8 hardware; its
per-channel scale times 256 multiplies the accumulated row once at the end.

`weight_tile` (the decoding) and `plane_args` are shared with the fused decode GEMVs (gemv.py,
gemv_qkv.py). The graph executor calls `quant_matmul` for the batches its fused GEMVs do not take, up to
`GraphExecutor.quant_gemm_max_rows` rows, and `dequantize_matrix` (the same decoding written out in the
compute dtype, then one cuBLAS GEMM) for longer ones: with hundreds of rows a GEMM is compute bound, and
cuBLAS's tuned tiles should gain more than the extra bytes (read 1, write 2, read 2 per FP8 weight) cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.decode_attention import dot_options
from megatier.quant.blocks import QuantWeight

KIND_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "FP8": 4}
# The planes each kind passes as p0..p4 (q first); missing ones are passed as q again and never read.
PLANES = {
    "Q8_0": ("q", "d"),
    "Q4_0": ("q", "d"),
    "Q4_1": ("q", "d", "m"),
    "Q4_K": ("q", "d", "dmin", "sc", "mn"),
    "FP8": ("q", "scale"),
}


FP8_UNIT = tl.constexpr(256.0)  # an FP8 tile holds its codes' values / 256: the row scale is multiplied by this


@triton.jit
def weight_tile(q_ptr, p1, p2, p3, p4, n, k, mask, K, KIND: tl.constexpr):
    """The fp32 weights W[n, k] of a tile (n and k broadcast against each other; element by element, so
    any tile shape works), FP8 as its codes' values / 256, before the row scale."""
    if KIND == 0:  # Q8_0: q [N, K] int8, d [N, K/32]
        q = tl.load(q_ptr + n * K + k, mask=mask, other=0).to(tl.float32)
        return q * tl.load(p1 + n * (K // 32) + k // 32, mask=mask, other=0.0).to(tl.float32)
    if KIND == 4:  # FP8 e4m3 bytes -> fp16 bits: sign to bit 15, exponent and mantissa to bits 7..13
        b = tl.load(q_ptr + n * K + k, mask=mask, other=0).to(tl.int32)
        bits = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.uint16)
        return bits.to(tl.float16, bitcast=True).to(tl.float32)
    if KIND == 3:  # Q4_K: q [N, K/256, 4, 32], 8 sub-blocks of 32 with 6-bit scales and minimums
        j = k % 256
        byte = tl.load(q_ptr + n * (K // 2) + (k // 256) * 128 + (j // 64) * 32 + j % 32, mask=mask, other=0)
        nibble = ((byte.to(tl.int32) >> (((j % 64) // 32) * 4)) & 15).to(tl.float32)
        block = n * (K // 256) + k // 256
        sub = block * 8 + j // 32
        scale = tl.load(p1 + block, mask=mask, other=0.0).to(tl.float32) * tl.load(p3 + sub, mask=mask, other=0).to(
            tl.float32
        )
        offset = tl.load(p2 + block, mask=mask, other=0.0).to(tl.float32) * tl.load(p4 + sub, mask=mask, other=0).to(
            tl.float32
        )
        return scale * nibble - offset
    # Q4_0 / Q4_1: q [N, K/32, 16]; weight i of a block in byte i's low nibble, weight 16 + i in its high
    j = k % 32
    byte = tl.load(q_ptr + n * (K // 2) + (k // 32) * 16 + j % 16, mask=mask, other=0)
    nibble = ((byte.to(tl.int32) >> ((j // 16) * 4)) & 15).to(tl.float32)
    d = tl.load(p1 + n * (K // 32) + k // 32, mask=mask, other=0.0).to(tl.float32)
    if KIND == 1:
        return d * (nibble - 8.0)
    return d * nibble + tl.load(p2 + n * (K // 32) + k // 32, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quant_matmul_kernel(
    x_ptr,
    q_ptr,
    p1,
    p2,
    p3,
    p4,
    out_ptr,
    M,
    N,
    K,
    stride_x,
    stride_out,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = m < M, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = weight_tile(q_ptr, p1, p2, p3, p4, n[:, None], k[None, :], n_mask[:, None] & k_mask[None, :], K, KIND)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if KIND == 4:
        acc *= tl.load(p1 + n, mask=n_mask, other=0.0)[None, :] * FP8_UNIT
    out = out_ptr + m[:, None] * stride_out + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def plane_args(w: QuantWeight) -> list[torch.Tensor]:
    """The five plane arguments of `weight_tile` for w: q first (FP8 as bytes), the unused ones q again.
    The kernels address planes as contiguous rows."""
    planes = [w.planes[name].contiguous() for name in PLANES[w.kind]]
    if w.kind == "FP8":
        planes[0] = planes[0].view(torch.uint8)
    return planes + [planes[0]] * (5 - len(planes))


def quant_matmul(x: torch.Tensor, w: QuantWeight, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, fp32 accumulation; block_k a multiple of 32."""
    n, k = w.shape
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    planes = plane_args(w)
    block_m = max(16, min(64, triton.next_power_of_2(x2.shape[0])))
    grid = (triton.cdiv(n, block_n), triton.cdiv(x2.shape[0], block_m))
    _quant_matmul_kernel[grid](
        x2,
        *planes,
        out,
        x2.shape[0],
        n,
        k,
        x2.stride(0),
        out.stride(0),
        KIND=KIND_CODES[w.kind],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **dot_options(x.dtype),
    )
    return out.reshape(*x.shape[:-1], n)


@triton.jit
def _dequantize_kernel(
    q_ptr, p1, p2, p3, p4, out_ptr, N, K, KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (n < N)[:, None] & (k < K)[None, :]
    w = weight_tile(q_ptr, p1, p2, p3, p4, n[:, None], k[None, :], mask, K, KIND)
    if KIND == 4:
        w *= tl.load(p1 + n, mask=n < N, other=0.0)[:, None] * FP8_UNIT
    tl.store(out_ptr + n[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_matrix(w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """W as a [N, K] tensor of `dtype` on w's device, in one pass (no fp32 copy of the matrix)."""
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    grid = (triton.cdiv(n, 16), triton.cdiv(k, 256))
    _dequantize_kernel[grid](*plane_args(w), out, n, k, KIND=KIND_CODES[w.kind], BLOCK_N=16, BLOCK_K=256)
    return out
