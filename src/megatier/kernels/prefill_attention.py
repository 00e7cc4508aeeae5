"""Causal attention for a ragged batch of prefill chunks, keys and values read from KV pages.

Sequence i brings query_lens[i] new tokens at positions starts[i].. (start > 0 for a later chunk of a
long prompt, or 1 token for a decode step) and attends to every position up to its own, all of them
already written into its pages. Flash-attention style: one program per (tile of BLOCK_M queries of
one sequence, query head) walks the keys in blocks with an online softmax, so scores never reach memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megatier.kernels.decode_attention import dot_options, load_kv_tile
from megatier.kernels.pdl import use_pdl


@triton.jit
def _prefill_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    block_tables_ptr,
    tile_seq_ptr,
    tile_first_ptr,
    seq_first_token_ptr,
    query_lens_ptr,
    starts_ptr,
    scale,
    page_size,
    head_dim,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_kv_page,
    stride_kv_v,
    stride_kv_head,
    stride_kv_row,
    stride_table,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.load(tile_seq_ptr + tile)
    first = tl.load(tile_first_ptr + tile)  # index of the tile's first query within its sequence
    query_len = tl.load(query_lens_ptr + seq)
    start = tl.load(starts_ptr + seq)
    token0 = tl.load(seq_first_token_ptr + seq)

    m = first + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_mask = (m < query_len)[:, None] & (d < head_dim)[None, :]
    tokens = (token0 + m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_token + head * stride_q_head + d[None, :], mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = start + m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    kv_end = start + tl.minimum(first + BLOCK_M, query_len)  # the tile's last query sees keys below this
    for key0 in range(0, kv_end, BLOCK_N):
        t = key0 + tl.arange(0, BLOCK_N)
        t_mask = t < kv_end
        k, v = load_kv_tile(
            kv_ptr, table, t, t_mask, d, head_dim, page_size, kv_head,
            stride_kv_page, stride_kv_v, stride_kv_head, stride_kv_row, DOT_FP32,
        )  # fmt: skip
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        visible = t_mask[None, :] & (t[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # Key 0 is visible to every row, so m_i is finite after the first block and no row sees NaN.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_out_token + head * stride_out_head + d[None, :], out, mask=q_mask)


def paged_prefill_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    starts: list[int],
    query_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] (the new tokens of every sequence, one after another) over layer
    `layer` of kv [pages, layers, 2, kv_heads, page_size, D]; block_tables [B, max_pages] int32.
    Returns [T, H, D] in q's dtype."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, page_size = kv.shape[3], kv.shape[4]
    compiled = os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter runs small blocks faster
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = (64 if block_d <= 128 else 32) if compiled else 16
    tile_seq, tile_first, seq_first_token = [], [], []
    token = 0
    for i, n in enumerate(query_lens):
        seq_first_token.append(token)
        token += n
        for first in range(0, n, block_m):
            tile_seq.append(i)
            tile_first.append(first)
    if token != num_tokens:
        raise ValueError(f"query_lens sum to {token} but q holds {num_tokens} tokens")
    meta = torch.tensor([tile_seq, tile_first], dtype=torch.int32).to(q.device)
    per_seq = torch.tensor([seq_first_token, query_lens, starts], dtype=torch.int32).to(q.device)
    out = torch.empty_like(q)
    kv_layer = kv[:, layer]
    pdl = use_pdl(q.device)
    if tile_seq:
        _prefill_kernel[(len(tile_seq), num_heads)](
            q,
            kv_layer,
            out,
            block_tables,
            meta[0],
            meta[1],
            per_seq[0],
            per_seq[1],
            per_seq[2],
            scale,
            page_size,
            head_dim,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            kv_layer.stride(0),
            kv_layer.stride(1),
            kv_layer.stride(2),
            kv_layer.stride(3),
            block_tables.stride(0),
            GROUP=num_heads // num_kv_heads,
            BLOCK_M=block_m,
            BLOCK_N=64 if compiled else 16,
            BLOCK_D=block_d,
            **dot_options(q.dtype),
            USE_PDL=pdl,
            num_warps=4 if block_d <= 64 else 8,
            num_stages=2,
            launch_pdl=pdl,
        )
    return out
