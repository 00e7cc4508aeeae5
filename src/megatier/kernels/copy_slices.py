"""Copy or swap many KV slices between pools in one launch: HBM <-> pinned host memory <-> HBM.

A slice is one (page, layer) block of K and V, a few tens of KiB; the tiered KV cache moves and fetches
them by the thousand, scattered over both pools. One cudaMemcpy per slice would be bound by launch cost,
so one program per slice streams it with wide loads instead. Pinned host memory is mapped into the GPU's
address space (UVA), so the same kernel reads or writes host pools over PCIe (zero-copy). The slice
indices and their count live in device tensors: a captured CUDA graph copies whatever the current step
put there, and programs past `count` do nothing. A swap exchanges two slots' contents in place, so a
migration that promotes one slice and demotes another needs no free slot on either side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # int32 words a program moves per iteration (8 KiB)


@triton.jit
def _copy_slices_kernel(src_ptr, dst_ptr, src_idx_ptr, dst_idx_ptr, count_ptr, words, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    if i < tl.load(count_ptr):
        src = src_ptr + tl.load(src_idx_ptr + i).to(tl.int64) * words
        dst = dst_ptr + tl.load(dst_idx_ptr + i).to(tl.int64) * words
        for start in range(0, words, BLOCK):
            w = start + tl.arange(0, BLOCK)
            tl.store(dst + w, tl.load(src + w, mask=w < words), mask=w < words)


@triton.jit
def _swap_slices_kernel(a_ptr, b_ptr, a_idx_ptr, b_idx_ptr, words, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    a = a_ptr + tl.load(a_idx_ptr + i).to(tl.int64) * words
    b = b_ptr + tl.load(b_idx_ptr + i).to(tl.int64) * words
    for start in range(0, words, BLOCK):
        w = start + tl.arange(0, BLOCK)
        x = tl.load(a + w, mask=w < words)
        y = tl.load(b + w, mask=w < words)
        tl.store(a + w, y, mask=w < words)
        tl.store(b + w, x, mask=w < words)


def _words(pool: torch.Tensor) -> torch.Tensor:
    """The pool as [slots, words] int32 (slices are whole 4-byte words: page_size * head_dim is even)."""
    return pool.view(pool.shape[0], -1).view(torch.int32)


def copy_slices(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    count: torch.Tensor | None = None,
    *,
    kernel: bool | None = None,
) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for i < count (default: all), for pools [slots, ...] of one dtype.

    On CUDA the Triton kernel runs (either pool may be pinned host memory); without CUDA torch indexing
    does the same, unless `kernel` forces the kernel (tests run it under TRITON_INTERPRET=1)."""
    _check_pools("copy_slices", src, dst)
    n = src_idx.shape[0]
    if not (kernel if kernel is not None else src.is_cuda or dst.is_cuda):
        m = n if count is None else int(count)
        dst[dst_idx[:m].long()] = src[src_idx[:m].long()]
        return
    if n == 0:
        return
    if count is None:
        count = torch.full((1,), n, dtype=torch.int32, device=src_idx.device)
    s, d = _words(src), _words(dst)
    _copy_slices_kernel[(n,)](s, d, src_idx, dst_idx, count, s.shape[1], BLOCK=BLOCK, num_warps=8)


def swap_slices(
    a: torch.Tensor, b: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, *, kernel: bool | None = None
) -> None:
    """Exchange a[a_idx[i]] and b[b_idx[i]] for every i, on the current stream (indices are distinct).

    On CUDA the Triton kernel runs (either pool may be pinned host memory, the indices on the device);
    without CUDA torch indexing does the same, unless `kernel` forces the kernel."""
    _check_pools("swap_slices", a, b)
    if not (kernel if kernel is not None else a.is_cuda or b.is_cuda):
        a_rows, b_rows = a_idx.long(), b_idx.long()
        held = a[a_rows].clone()
        a[a_rows] = b[b_rows]
        b[b_rows] = held
        return
    if a_idx.shape[0]:
        wa, wb = _words(a), _words(b)
        _swap_slices_kernel[(a_idx.shape[0],)](wa, wb, a_idx, b_idx, wa.shape[1], BLOCK=BLOCK, num_warps=8)


def _check_pools(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != b.dtype or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{name}: pools differ ({a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)})")
