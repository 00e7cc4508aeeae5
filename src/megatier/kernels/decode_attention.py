"""Paged split-KV decode attention: one query token per sequence, keys and values read from KV pages.

Stage 1 runs one program per (sequence, kv head, split). A program serves every query head of its GQA
group (so K and V are read once per group) over its share of the sequence's tokens, and writes its
partial as (normalized output, lse) in fp32. Stage 2 merges the splits exactly (merge.py). With one
split, stage 1 writes the final output directly and stage 2 is skipped.

Token t < seq_lens[b] of sequence b lives in page block_tables[b, t // page_size], row t % page_size.
The pages need not be a whole sequence: the tiered KV code passes any subset of a sequence's pages
(full pages, at most one partial page at the end) and merges the results of several such calls.
Split bounds are computed in the kernel from seq_lens, so a captured CUDA graph stays valid as the
sequences grow; only the number of splits is fixed per launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megatier.kernels.merge import merge_attention_states
from megatier.kernels.pdl import use_pdl


@triton.jit
def load_kv_tile(
    kv_ptr, table, t, t_mask, d, head_dim, page_size, kv_head,
    stride_kv_page, stride_kv_v, stride_kv_head, stride_kv_row, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """K and V [len(t), BLOCK_D] of one kv head for the sequence positions `t` (masked: t_mask), each
    read from its page in `table` (the sequence's row of the block table); zeros where masked."""
    page = tl.load(table + t // page_size, mask=t_mask, other=0).to(tl.int64)
    row_offset = page * stride_kv_page + kv_head * stride_kv_head + (t % page_size) * stride_kv_row
    kv_mask = t_mask[:, None] & (d < head_dim)[None, :]
    k = tl.load(kv_ptr + row_offset[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(kv_ptr + stride_kv_v + row_offset[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _decode_split_kernel(
    q_ptr,
    kv_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    scale,
    num_splits,
    page_size,
    head_dim,
    stride_q_seq,
    stride_q_head,
    stride_kv_page,
    stride_kv_v,
    stride_kv_head,
    stride_kv_row,
    stride_table,
    stride_out_split,
    stride_out_seq,
    stride_out_head,
    stride_lse_split,
    stride_lse_seq,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    seq_len = tl.load(seq_lens_ptr + seq)
    blocks_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    begin = split * blocks_per_split * BLOCK_N
    end = tl.minimum(begin + blocks_per_split * BLOCK_N, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    head_mask = (g < GROUP)[:, None] & (d < head_dim)[None, :]
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + d[None, :], mask=head_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    for start in range(begin, end, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_mask = t < end
        k, v = load_kv_tile(
            kv_ptr, table, t, t_mask, d, head_dim, page_size, kv_head,
            stride_kv_page, stride_kv_v, stride_kv_head, stride_kv_row, DOT_FP32,
        )  # fmt: skip
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    out_offset = split * stride_out_split + seq * stride_out_seq + heads[:, None] * stride_out_head + d[None, :]
    tl.store(out_ptr + out_offset, out, mask=head_mask)
    tl.store(lse_ptr + split * stride_lse_split + seq * stride_lse_seq + heads, lse, mask=g < GROUP)


def dot_options(dtype: torch.dtype) -> dict:
    """How the attention kernels multiply: on fp32 operands with exact (not tf32) products for fp32
    storage and under the Triton interpreter, whose bf16 dots are wrong; else on the storage dtype."""
    fp32 = dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    return {"DOT_FP32": fp32, "DOT_PRECISION": "ieee" if fp32 else "tf32"}


def paged_decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_splits: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, D] over the pages of each sequence in layer `layer` of the KV cache
    kv [pages, layers, 2, kv_heads, page_size, D]; block_tables [B, max_pages] and seq_lens [B] int32.

    Returns (out [B, H, D] in q's dtype, lse [B, H] fp32, natural log). seq_lens[b] == 0 gives out 0
    and lse -inf.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, page_size = kv.shape[3], kv.shape[4]
    group = num_heads // num_kv_heads
    kv_layer = kv[:, layer]
    out = torch.empty_like(q)
    lse = torch.empty((num_seqs, num_heads), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        part_out = torch.empty((num_splits, num_seqs, num_heads, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, num_seqs, num_heads), dtype=torch.float32, device=q.device)
    compiled = os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter runs small blocks faster
    pdl = use_pdl(q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        kv_layer,
        block_tables,
        seq_lens,
        part_out,
        part_lse,
        scale,
        num_splits,
        page_size,
        head_dim,
        q.stride(0),
        q.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        block_tables.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=64 if compiled else 16,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        **dot_options(q.dtype),
        USE_PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    if num_splits > 1:
        out, lse = merge_attention_states(part_out, part_lse, out_dtype=q.dtype)
    return out, lse
