"""Exact merge of attention partials by the log-sum-exp rule.

A partial is attention over a subset of the keys: its normalized output o_t and lse_t, the natural log
of its softmax denominator (-inf for an empty subset). Over the union of disjoint subsets:
    LSE = logsumexp_t(lse_t),   out = sum_t exp(lse_t - LSE) * o_t.
The rule is associative and order-free, so splits of one sequence and tiers of one KV cache merge the
same way. Rows where every partial is empty come out as output 0 and lse -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.pdl import use_pdl


@triton.jit
def _merge_kernel(
    outs_ptr,
    lses_ptr,
    out_ptr,
    lse_out_ptr,
    num_parts,
    num_rows,
    head_dim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    part_mask = s < num_parts
    lse = tl.load(lses_ptr + s.to(tl.int64) * num_rows + row, mask=part_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all empty: weights become exp(-inf) = 0
    weight = tl.exp(lse - lse_max)
    total = tl.sum(weight, axis=0)
    offsets = (s.to(tl.int64)[:, None] * num_rows + row) * head_dim + d[None, :]
    outs = tl.load(outs_ptr + offsets, mask=part_mask[:, None] & (d[None, :] < head_dim), other=0.0)
    outs = tl.where(weight[:, None] > 0, outs.to(tl.float32), 0.0)  # an empty partial's output is never read
    acc = tl.sum(weight[:, None] * outs, axis=0)
    out = tl.where(total > 0, acc / total, 0.0)
    tl.store(out_ptr + row.to(tl.int64) * head_dim + d, out, mask=d < head_dim)
    tl.store(lse_out_ptr + row, lse_max + tl.log(total))


def merge_attention_states(
    outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials outs [S, ..., D] with lses [S, ...] (fp32) into (out [..., D], lse [...] fp32).

    `out_dtype` defaults to the partials' dtype; accumulation is fp32 whatever the storage.
    """
    num_parts, head_dim = outs.shape[0], outs.shape[-1]
    if lses.shape != outs.shape[:-1]:
        raise ValueError(f"lses shape {tuple(lses.shape)} does not match outs shape {tuple(outs.shape)}")
    rows_shape = outs.shape[1:-1]
    num_rows = lses[0].numel()
    outs = outs.reshape(num_parts, num_rows, head_dim).contiguous()
    lses = lses.reshape(num_parts, num_rows).float().contiguous()
    out = torch.empty((num_rows, head_dim), dtype=out_dtype or outs.dtype, device=outs.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=outs.device)
    if num_rows:
        pdl = use_pdl(outs.device)
        _merge_kernel[(num_rows,)](
            outs,
            lses,
            out,
            lse,
            num_parts,
            num_rows,
            head_dim,
            BLOCK_S=max(2, triton.next_power_of_2(num_parts)),
            BLOCK_D=triton.next_power_of_2(head_dim),
            USE_PDL=pdl,
            launch_pdl=pdl,
        )
    return out.reshape(*rows_shape, head_dim), lse.reshape(rows_shape)


def merge_attention_states_reference(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same merge in plain PyTorch (fp32), for tests."""
    lse = torch.logsumexp(lses.float(), dim=0)
    finite = torch.where(lse.isneginf(), 0.0, lse)
    weight = torch.exp(lses.float() - finite)
    parts = torch.where(weight[..., None] > 0, outs.float(), 0.0)
    out = (weight[..., None] * parts).sum(0)
    total = weight.sum(0)[..., None]
    return torch.where(total > 0, out / total, 0.0), lse
