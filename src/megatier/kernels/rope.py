"""RoPE on q and k, fused with the KV-page append and (Qwen3) the per-head RMSNorm of q and k.

Reads the output of the stacked qkv projection once: q heads come out rotated into a separate
[T, H, D] buffer for attention; k heads (rotated) and v heads go straight into the KV pages. Rotation
is rotate-half (pairs i and i + head_dim/2) with cos/sin read from an fp32 table built once with the
same arithmetic as the reference. A token whose position is negative (a padding row of a captured
decode batch) computes q but writes no KV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.pdl import use_pdl


def rope_cos_sin_table(inv_freq: torch.Tensor, num_positions: int) -> torch.Tensor:
    """[num_positions, head_dim] fp32: row p is cos(p * inv_freq) | sin(p * inv_freq)."""
    positions = torch.arange(num_positions, device=inv_freq.device).float()
    freqs = positions[:, None] * inv_freq[None, :].float()
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


@triton.jit
def _rotate(head_ptrs, norm_ptr, cos, sin, half, eps, mask, QK_NORM: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Heads starting at head_ptrs [heads, 1], optionally RMS-normalized, rotated: their halves in fp32."""
    i = tl.arange(0, BLOCK_HALF)[None, :]
    x1 = tl.load(head_ptrs + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(head_ptrs + half + i, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)[:, None]
        x1 = x1 * inv_rms * tl.load(norm_ptr + i, mask=i < half, other=0.0).to(tl.float32)
        x2 = x2 * inv_rms * tl.load(norm_ptr + half + i, mask=i < half, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_append_kernel(
    qkv_ptr,
    q_out_ptr,
    kv_ptr,
    positions_ptr,
    seq_ids_ptr,
    block_tables_ptr,
    cos_sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    eps,
    num_heads,
    num_kv_heads,
    half,
    page_size,
    stride_qkv_token,
    stride_q_out_token,
    stride_kv_page,
    stride_kv_v,
    stride_kv_head,
    stride_kv_row,
    stride_table,
    stride_cos_sin,
    QK_NORM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    head_dim = 2 * half
    pos = tl.load(positions_ptr + token)
    i = tl.arange(0, BLOCK_HALF)
    cos_sin_row = cos_sin_ptr + tl.maximum(pos, 0).to(tl.int64) * stride_cos_sin
    cos = tl.load(cos_sin_row + i, mask=i < half, other=0.0)[None, :]
    sin = tl.load(cos_sin_row + half + i, mask=i < half, other=0.0)[None, :]
    src = qkv_ptr + token * stride_qkv_token

    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    mask = (heads < num_heads) & (i < half)[None, :]
    r1, r2 = _rotate(src + heads * head_dim, q_norm_ptr, cos, sin, half, eps, mask, QK_NORM, BLOCK_HALF)
    dst = q_out_ptr + token * stride_q_out_token + heads * head_dim + i[None, :]
    tl.store(dst, r1, mask=mask)
    tl.store(dst + half, r2, mask=mask)

    if pos >= 0:
        kv_heads = tl.arange(0, BLOCK_KV_HEADS)[:, None]
        kv_mask = (kv_heads < num_kv_heads) & (i < half)[None, :]
        k_src = src + (num_heads + kv_heads) * head_dim
        k1, k2 = _rotate(k_src, k_norm_ptr, cos, sin, half, eps, kv_mask, QK_NORM, BLOCK_HALF)
        seq = tl.load(seq_ids_ptr + token)
        page = tl.load(block_tables_ptr + seq.to(tl.int64) * stride_table + pos // page_size).to(tl.int64)
        row = page * stride_kv_page + kv_heads * stride_kv_head + (pos % page_size) * stride_kv_row
        k_dst = kv_ptr + row + i[None, :]
        tl.store(k_dst, k1, mask=kv_mask)
        tl.store(k_dst + half, k2, mask=kv_mask)
        v_src = k_src + num_kv_heads * head_dim + i[None, :]
        tl.store(k_dst + stride_kv_v, tl.load(v_src, mask=kv_mask), mask=kv_mask)
        tl.store(k_dst + stride_kv_v + half, tl.load(v_src + half, mask=kv_mask), mask=kv_mask)


def rope_append(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    seq_ids: torch.Tensor,
    block_tables: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    cos_sin: torch.Tensor,
    num_heads: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """qkv [T, (H + 2 * Hkv) * D] (rows q | k | v), positions and seq_ids [T] int32 (token t belongs to
    row seq_ids[t] of block_tables [B, max_pages]); writes K and V of layer `layer` into
    kv [pages, layers, 2, Hkv, page_size, D] and returns rotated q [T, H, D] in qkv's dtype.
    q_norm/k_norm [D] (both or neither) apply RMSNorm per head before the rotation."""
    num_tokens = qkv.shape[0]
    num_kv_heads, page_size, head_dim = kv.shape[3], kv.shape[4], kv.shape[5]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    kv_layer = kv[:, layer]
    qk_norm = q_norm is not None
    pdl = use_pdl(qkv.device)
    if num_tokens:
        _rope_append_kernel[(num_tokens,)](
            qkv,
            q,
            kv_layer,
            positions,
            seq_ids,
            block_tables,
            cos_sin,
            q_norm if qk_norm else cos_sin,
            k_norm if qk_norm else cos_sin,
            eps,
            num_heads,
            num_kv_heads,
            head_dim // 2,
            page_size,
            qkv.stride(0),
            q.stride(0),
            kv_layer.stride(0),
            kv_layer.stride(1),
            kv_layer.stride(2),
            kv_layer.stride(3),
            block_tables.stride(0),
            cos_sin.stride(0),
            QK_NORM=qk_norm,
            BLOCK_HEADS=max(2, triton.next_power_of_2(num_heads)),
            BLOCK_KV_HEADS=max(2, triton.next_power_of_2(num_kv_heads)),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            USE_PDL=pdl,
            num_warps=4,
            launch_pdl=pdl,
        )
    return q
