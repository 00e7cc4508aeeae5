"""The decode qkv projection as one kernel: RMSNorm prologue, stacked q|k|v GEMV, bias, (Qwen3) per-head
q/k RMSNorm, RoPE, then q to its buffer and K/V straight into the KV pages.

A program owns elements [i0, i0 + BLOCK_P) of both halves of one head (rows h*D + i and h*D + i + D/2 of
the stacked weight), so rotate-half pairs meet in one program and nothing is written back for a second
kernel to rotate. With per-head q/k norm a program holds the whole head. Positions come from seq_lens on
the device (position = length - 1); a padding row (length 0) computes q but writes no KV. The GEMV
machinery (prefetch before the PDL wait, pipelined loop, norm as a per-row scale) is gemv.py's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.decode_attention import dot_options
from megatier.kernels.gemv import Matrix, block_m_for, gemv_config, matvec, prefetch_lines, prefetch_rows, weight_args
from megatier.kernels.pdl import use_pdl


@triton.jit
def _qkv_rope_kernel(
    residual_ptr,
    norm_ptr,
    w_ptr,
    p1,
    p2,
    p3,
    p4,
    bias_ptr,
    q_norm_ptr,
    k_norm_ptr,
    q_out_ptr,
    kv_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    cos_sin_ptr,
    num_rows,
    K,
    eps,
    num_heads,
    num_kv_heads,
    half,
    page_size,
    stride_residual,
    stride_w,
    stride_q_out,
    stride_kv_page,
    stride_kv_v,
    stride_kv_head,
    stride_kv_row,
    stride_table,
    stride_cos_sin,
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QK_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    head = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # element of the head's first half
    i_mask = i < half
    head_dim = 2 * half
    rows_a = head * head_dim + i
    rows_b = rows_a + half
    if USE_PDL:
        if PREFETCH_LINES > 0:  # 0: no prefetch
            prefetch_rows(w_ptr, rows_a, i_mask, stride_w, K if KIND < 0 else stride_w, PREFETCH_LINES)
            prefetch_rows(w_ptr, rows_b, i_mask, stride_w, K if KIND < 0 else stride_w, PREFETCH_LINES)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    y1, y2, sum_sq = matvec(
        residual_ptr, stride_residual, num_rows, norm_ptr, w_ptr, p1, p2, p3, p4, stride_w, rows_a, rows_b, i_mask,
        K, KIND, True, True, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    inv_rms = tl.rsqrt(sum_sq / K + eps)[None, :]
    y1 *= inv_rms
    y2 *= inv_rms
    if HAS_BIAS:
        y1 += tl.load(bias_ptr + rows_a, mask=i_mask, other=0.0).to(tl.float32)[:, None]
        y2 += tl.load(bias_ptr + rows_b, mask=i_mask, other=0.0).to(tl.float32)[:, None]

    is_q = head < num_heads
    is_k = (head >= num_heads) & (head < num_heads + num_kv_heads)
    rotate = is_q | is_k
    if QK_NORM:  # the whole head is in this program; masked elements are 0
        head_rms = tl.rsqrt((tl.sum(y1 * y1, axis=0) + tl.sum(y2 * y2, axis=0)) / head_dim + eps)[None, :]
        q1 = tl.load(q_norm_ptr + i, mask=i_mask, other=0.0)
        q2 = tl.load(q_norm_ptr + half + i, mask=i_mask, other=0.0)
        w1 = tl.where(is_q, q1, tl.load(k_norm_ptr + i, mask=i_mask, other=0.0))
        w2 = tl.where(is_q, q2, tl.load(k_norm_ptr + half + i, mask=i_mask, other=0.0))
        y1 = tl.where(rotate, y1 * head_rms * w1.to(tl.float32)[:, None], y1)
        y2 = tl.where(rotate, y2 * head_rms * w2.to(tl.float32)[:, None], y2)

    m = tl.arange(0, BLOCK_M)
    m_mask = m < num_rows
    pos = tl.load(seq_lens_ptr + m, mask=m_mask, other=0) - 1  # -1: a padding row
    cos_sin = cos_sin_ptr + tl.maximum(pos, 0).to(tl.int64)[None, :] * stride_cos_sin + i[:, None]
    pair_mask = i_mask[:, None] & m_mask[None, :]
    cos = tl.load(cos_sin, mask=pair_mask, other=0.0)
    sin = tl.load(cos_sin + half, mask=pair_mask, other=0.0)
    r1 = tl.where(rotate, y1 * cos - y2 * sin, y1)
    r2 = tl.where(rotate, y2 * cos + y1 * sin, y2)

    q_ptrs = q_out_ptr + m[None, :] * stride_q_out + head * head_dim + i[:, None]
    q_mask = pair_mask & is_q
    tl.store(q_ptrs, r1, mask=q_mask)
    tl.store(q_ptrs + half, r2, mask=q_mask)

    writes = m_mask & (pos >= 0)
    page = tl.load(block_tables_ptr + m * stride_table + tl.maximum(pos, 0) // page_size, mask=writes, other=0)
    kv_head = tl.where(is_k, head - num_heads, head - num_heads - num_kv_heads)
    slot = page.to(tl.int64) * stride_kv_page + (pos % page_size) * stride_kv_row
    kv_ptrs = kv_ptr + tl.where(is_k, 0, stride_kv_v) + kv_head * stride_kv_head + slot[None, :] + i[:, None]
    kv_mask = i_mask[:, None] & writes[None, :] & (head >= num_heads)
    tl.store(kv_ptrs, r1, mask=kv_mask)
    tl.store(kv_ptrs + half, r2, mask=kv_mask)


def gemv_qkv_rope(
    residual: torch.Tensor,
    norm: torch.Tensor,
    w: Matrix,
    bias: torch.Tensor | None,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    cos_sin: torch.Tensor,
    num_heads: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """For decode rows of residual [M, hidden] fp32: h = rmsnorm(residual) * norm, qkv = h @ w^T + bias
    (w [(H + 2 Hkv) * D, hidden], rows q | k | v), q/k normed per head if q_norm/k_norm [D] are given,
    rotated at position seq_lens[m] - 1. Writes K and V of layer `layer` into
    kv [pages, layers, 2, Hkv, page_size, D] through block_tables [M, max_pages] (rows with seq_lens 0
    write nothing) and returns rotated q [M, H, D] in kv's dtype (the compute dtype). w may be a QuantWeight."""
    num_rows, k = residual.shape
    num_kv_heads, page_size, head_dim = kv.shape[3], kv.shape[4], kv.shape[5]
    half = head_dim // 2
    block_m = block_m_for(num_rows)
    cfg = gemv_config("qkv", w.shape[0], k, block_m)
    qk_norm = q_norm is not None
    block_p = max(cfg.block_n, triton.next_power_of_2(half)) if qk_norm else cfg.block_n
    block_p = min(block_p, max(16 if block_m > 1 else 1, triton.next_power_of_2(half)))
    q = torch.empty((num_rows, num_heads, head_dim), dtype=kv.dtype, device=w.device)
    wa = weight_args(w, kv.dtype)
    kv_layer = kv[:, layer]
    pdl = use_pdl(w.device)
    grid = (num_heads + 2 * num_kv_heads, triton.cdiv(half, block_p))
    _qkv_rope_kernel[grid](
        residual, norm, *wa.ptrs, norm if bias is None else bias, q_norm if qk_norm else norm,
        k_norm if qk_norm else norm,
        q, kv_layer, seq_lens, block_tables, cos_sin, num_rows, k, eps, num_heads, num_kv_heads, half, page_size,
        residual.stride(0), wa.stride, q.stride(0), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
        kv_layer.stride(3), block_tables.stride(0), cos_sin.stride(0),
        KIND=wa.kind, HAS_BIAS=bias is not None, QK_NORM=qk_norm, BLOCK_M=block_m, BLOCK_N=block_p,
        BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages, PREFETCH_LINES=prefetch_lines(2 * block_p, wa.row_bytes, 1),
        **dot_options(wa.dtype), USE_PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return q
