"""Quest page scores of a sparse decode step in one pass over the key metadata.

For each sequence b and page column c of its table, the score is the best upper bound of q.k over the
page's keys, over all query heads: max_h sum_d (max(q,0) * kmax + min(q,0) * kmin), times the softmax
scale; columns at or past the sequence's page count get -inf. One program serves a block of one row's
columns and every kv head, reading each page's min/max once for the query heads of its GQA group: two
small matrix products per kv head, [pages, D] x [D, group], on the tensor cores. (The torch form,
kv/locality.py's PageMeta.score, gathers the metadata as fp32 and materializes the per-head bounds: on
the 1B bench at 32K that was ~1 ms a layer, most of the sparse step.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.decode_attention import dot_options


@triton.jit
def _page_scores_kernel(
    q_ptr,
    meta_ptr,
    tables_ptr,
    num_pages_ptr,
    out_ptr,
    scale,
    width,
    num_kv_heads,
    head_dim,
    stride_q_seq,
    stride_q_head,
    stride_meta_page,
    stride_meta_head,
    stride_meta_bound,
    stride_tables,
    stride_out,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_table = cols < width
    valid = in_table & (cols < tl.load(num_pages_ptr + row))
    page = tl.load(tables_ptr + row * stride_tables + cols, mask=valid, other=0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    q_mask = (g < GROUP)[:, None] & (d < head_dim)[None, :]
    meta_mask = valid[:, None] & (d < head_dim)[None, :]
    best = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    for h in range(num_kv_heads):
        heads = h * GROUP + g
        q = tl.load(q_ptr + row * stride_q_seq + heads[:, None] * stride_q_head + d[None, :], mask=q_mask, other=0.0)
        base = meta_ptr + page[:, None] * stride_meta_page + h * stride_meta_head + d[None, :]
        kmin = tl.load(base, mask=meta_mask, other=0.0)
        kmax = tl.load(base + stride_meta_bound, mask=meta_mask, other=0.0)
        if DOT_FP32:
            q, kmin, kmax = q.to(tl.float32), kmin.to(tl.float32), kmax.to(tl.float32)
        q_pos, q_neg = tl.trans(tl.maximum(q, 0.0).to(kmax.dtype)), tl.trans(tl.minimum(q, 0.0).to(kmin.dtype))
        bound = tl.dot(kmax, q_pos, input_precision=DOT_PRECISION)  # [BLOCK_P, BLOCK_G], fp32
        bound = tl.dot(kmin, q_neg, acc=bound, input_precision=DOT_PRECISION)
        bound = tl.where((g < GROUP)[None, :], bound, float("-inf"))
        best = tl.maximum(best, tl.max(bound, axis=1))
    tl.store(out_ptr + row * stride_out + cols, tl.where(valid, best * scale, float("-inf")), mask=in_table)


def page_scores(
    q: torch.Tensor, meta: torch.Tensor, tables: torch.Tensor, num_pages: torch.Tensor, scale: float
) -> torch.Tensor:
    """Scores [B, W] fp32 of q [B, H, D] over tables [B, W] of logical page ids, whose one layer's key
    metadata is meta [pages, kv_heads, 2 (min|max), D]; num_pages [B] marks each row's real columns."""
    rows, heads, head_dim = q.shape
    num_kv_heads, width = meta.shape[1], tables.shape[1]
    if meta.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("page_scores needs q and the metadata contiguous along head_dim")
    group = heads // num_kv_heads
    out = torch.empty((rows, width), dtype=torch.float32, device=q.device)
    block_p = 64
    _page_scores_kernel[(rows, triton.cdiv(width, block_p))](
        q,
        meta,
        tables,
        num_pages,
        out,
        scale,
        width,
        num_kv_heads,
        head_dim,
        q.stride(0),
        q.stride(1),
        meta.stride(0),
        meta.stride(1),
        meta.stride(2),
        tables.stride(0),
        out.stride(0),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot's smallest tile
        BLOCK_P=block_p,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        **dot_options(meta.dtype),
        num_warps=4,
    )
    return out
