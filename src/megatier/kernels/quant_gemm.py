"""y = x @ W^T for a QuantWeight (quant/blocks.py) on the GPU: the blocks are read as stored and
dequantized in registers, so a step streams 0.56 (Q4_0), 0.63 (Q4_1), 1.06 (Q8_0) or 1 (FP8) byte per
weight instead of 2 (bf16).

A program owns BLOCK_N output features for BLOCK_M activation rows (padded to 16 for tensor-core dots)
and loops over K in BLOCK_K steps (a multiple of 32, so one Q4_K sub-block or Q4/Q8 block is never split
between a tile's halves). Each weight is rebuilt from its plane bytes exactly as `QuantWeight.dequantize`
computes it, then multiplied in fp32 (fp32 storage, and the interpreter) or in x's 16-bit dtype, always
accumulating in fp32. FP8 bytes are decoded by integer arithmetic (sign and 7 exponent/mantissa bits
moved into fp32's places, times 2^120), exact for every finite code and needing no FP8 hardware; its
per-channel scale multiplies the accumulated row once at the end.

Not used by the executors yet: the graph executor's decode runs fused GEMVs inside CUDA graphs on the
packed plain weights, and wiring this in belongs with that loop.
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


@triton.jit
def _weights(q_ptr, p1, p2, p3, p4, n, k, mask, K, KIND: tl.constexpr):
    """The fp32 weights W[n, k] of a [BLOCK_N, BLOCK_K] tile (FP8: before its row scale)."""
    if KIND == 0:  # Q8_0: q [N, K] int8, d [N, K/32]
        q = tl.load(q_ptr + n * K + k, mask=mask, other=0).to(tl.float32)
        return q * tl.load(p1 + n * (K // 32) + k // 32, mask=mask, other=0.0).to(tl.float32)
    if KIND == 4:  # FP8 e4m3 bytes -> fp32 bits: sign to bit 31, exponent and mantissa to bits 20..26
        b = tl.load(q_ptr + n * K + k, mask=mask, other=0).to(tl.int32)
        bits = ((b & 0x7F) << 20) | ((b & 0x80) << 24)
        return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120
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
        w = _weights(q_ptr, p1, p2, p3, p4, n[:, None], k[None, :], n_mask[:, None] & k_mask[None, :], K, KIND)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if KIND == 4:
        acc *= tl.load(p1 + n, mask=n_mask, other=0.0)[None, :]
    out = out_ptr + m[:, None] * stride_out + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def quant_matmul(x: torch.Tensor, w: QuantWeight, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, fp32 accumulation; block_k a multiple of 32."""
    n, k = w.shape
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    planes = [w.planes[name] for name in PLANES[w.kind]]
    if w.kind == "FP8":
        planes[0] = planes[0].view(torch.uint8)
    planes += [planes[0]] * (5 - len(planes))
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
