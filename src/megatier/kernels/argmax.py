"""Greedy decoding's last step on the device: the argmax over the vocabulary and the feed-back.

The LM head kernel (gemv.py) leaves one (max, index) partial per program and batch row, so the
reduction over 128k logits is spread over the whole GPU instead of one block. This kernel reduces the
partials (ties to the lowest index, as torch.argmax does, so the result does not depend on the split)
and does the step's bookkeeping in the same launch: the token becomes the next step's input and
history[step] row, each live sequence grows by one (padding rows stay at length 0), step advances.
One program does every row, so `step` has a single reader and writer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.pdl import use_pdl


@triton.jit
def _greedy_feedback_kernel(
    part_val_ptr,
    part_idx_ptr,
    num_parts,
    num_rows,
    vocab,
    tokens_ptr,
    seq_lens_ptr,
    history_ptr,
    step_ptr,
    stride_history,
    BLOCK_P: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    step = tl.load(step_ptr)
    p = tl.arange(0, BLOCK_P)
    for row in range(num_rows):
        offsets = row * num_parts + p
        values = tl.load(part_val_ptr + offsets, mask=p < num_parts, other=float("-inf"))
        indices = tl.load(part_idx_ptr + offsets, mask=p < num_parts, other=vocab)
        best = tl.max(values, axis=0)
        token = tl.minimum(tl.min(tl.where(values == best, indices, vocab), axis=0), vocab - 1)  # NaN: stay in range
        tl.store(tokens_ptr + row, token)
        tl.store(history_ptr + step * stride_history + row, token.to(tl.int64))
        seq_len = tl.load(seq_lens_ptr + row)
        tl.store(seq_lens_ptr + row, seq_len + (seq_len > 0).to(tl.int32))
    tl.store(step_ptr, step + 1)


def greedy_feedback(
    part_val: torch.Tensor,
    part_idx: torch.Tensor,
    tokens: torch.Tensor,
    seq_lens: torch.Tensor,
    history: torch.Tensor,
    step: torch.Tensor,
    vocab: int,
) -> None:
    """Reduce argmax partials (values [M, P] fp32, indices [M, P] int32; an index of `vocab` marks an
    empty partial) to tokens [M] int32 (in place),
    write them to history[step] (history [S, >= M] int64, step [1] int64, then step += 1) and add 1 to
    every nonzero seq_lens [M]."""
    num_rows, num_parts = part_val.shape
    pdl = use_pdl(part_val.device)
    _greedy_feedback_kernel[(1,)](
        part_val, part_idx, num_parts, num_rows, vocab, tokens, seq_lens, history, step, history.stride(0),
        BLOCK_P=triton.next_power_of_2(num_parts), USE_PDL=pdl, num_warps=8, launch_pdl=pdl,
    )  # fmt: skip
