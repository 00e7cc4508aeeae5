"""x @ W^T for a QuantWeight: on the host for a few rows of x by the C kernel (quant/cmatmul.py) when it
builds, otherwise in plain vectorized torch (the reference path, CPU or CUDA), described here.

The matrix is never materialized in fp32: output features are taken a chunk at a time (about
CHUNK_ELEMENTS weights, a cache-sized fp32 tile), dequantized and multiplied. The per-block terms are
regrouped so a chunk needs few passes over its weights: a weight is d * q + m, so

    x @ W^T = x' @ (d * q)^T + x_blocksum @ m^T

where x' is x with each block's columns in the order the packed nibbles unpack to (low nibbles of every
block, then high nibbles: no interleaving copy) and x_blocksum [M, blocks] sums x over each block. The
products are the dequantized weights' up to fp32 rounding (the same math, summed in another order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatier.quant import cmatmul
from megatier.quant.blocks import QuantWeight, fp8_to_float

CHUNK_ELEMENTS = 1 << 20  # weights dequantized at once: a 4 MiB fp32 tile, which stays in L2/L3
# Up to this many rows of x, host products go to the C kernel (quant/cmatmul.py), which unpacks the
# weights in registers once per tile of x rows; more rows amortize this path's dequantized chunks over
# a BLAS matmul better.
C_MAX_ROWS = 16

Planes = dict[str, torch.Tensor]


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for plain and quantized weights; quantized ones accumulate in fp32 and return x's dtype."""
    if not isinstance(w, QuantWeight):
        return F.linear(x, w, bias)
    n, k = w.shape
    x2 = x.reshape(-1, k).float()
    if x2.shape[0] <= C_MAX_ROWS and x2.device.type == "cpu" and w.device.type == "cpu" and cmatmul.usable(w):
        out = cmatmul.matmul(x2, w)
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    prepare, chunk = MATMULS[w.kind]
    xs = prepare(x2)
    out = torch.empty((x2.shape[0], n), dtype=torch.float32, device=x.device)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, n, step):
        part = w.rows(start, start + step)
        out[:, start : start + part.shape[0]] = chunk(part.planes, xs)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def embedding(ids: torch.Tensor, w: torch.Tensor | QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of an embedding table (a quantized one dequantizes only those rows)."""
    if not isinstance(w, QuantWeight):
        return F.embedding(ids, w)
    return w.take_rows(ids.reshape(-1)).dequantize().to(dtype).reshape(*ids.shape, w.shape[1])


# ---- per-format chunks -----------------------------------------------------------------------------
# prepare(x [M, K] fp32) -> the views of x the chunks use; chunk(planes of R rows, those) -> [M, R] fp32.


def _split_halves(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as [M, groups, 2, K / groups / 2]: (first halves of every group, second halves), each
    flattened to [M, K / 2], the order in which packed low and high nibbles unpack."""
    v = x.view(x.shape[0], groups, 2, -1)
    return v[:, :, 0].reshape(x.shape[0], -1), v[:, :, 1].reshape(x.shape[0], -1)


def _prepare_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (x,)


def _chunk_q8_0(p: Planes, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    rows = p["q"].shape[0]
    w = p["q"].view(rows, -1, 32).float().mul_(p["d"].float()[..., None])
    return xs[0] @ w.view(rows, -1).T


def _prepare_q4(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    blocks = x.shape[1] // 32
    return (*_split_halves(x, blocks), x.view(x.shape[0], blocks, 32).sum(-1))


def _scaled_nibbles(q: torch.Tensor, scale_lo: torch.Tensor, scale_hi: torch.Tensor):
    """(low nibbles * scale_lo, high nibbles * scale_hi) in fp32, each flattened to [R, K / 2]."""
    rows = q.shape[0]
    lo = (q & 15).float().mul_(scale_lo)
    hi = (q >> 4).float().mul_(scale_hi)
    return lo.view(rows, -1), hi.view(rows, -1)


def _chunk_q4(p: Planes, xs: tuple[torch.Tensor, ...], offset: torch.Tensor) -> torch.Tensor:
    d = p["d"].float()[..., None]
    lo, hi = _scaled_nibbles(p["q"], d, d)
    x_lo, x_hi, x_sum = xs
    return (x_lo @ lo.T).addmm_(x_hi, hi.T).addmm_(x_sum, offset.T)


def _chunk_q4_0(p: Planes, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return _chunk_q4(p, xs, p["d"].float() * -8)  # d * (q - 8) = d * q - 8 d


def _chunk_q4_1(p: Planes, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return _chunk_q4(p, xs, p["m"].float())


def _prepare_q4_k(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    groups = x.shape[1] // 64  # 4 per 256-weight block: 32 low-nibble weights, then 32 high
    return (*_split_halves(x, groups), x.view(x.shape[0], groups * 2, 32).sum(-1))


def _chunk_q4_k(p: Planes, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    rows, blocks = p["d"].shape
    scale = (p["d"].float()[..., None] * p["sc"].float()).view(rows, blocks, 4, 2, 1)
    lo, hi = _scaled_nibbles(p["q"], scale[:, :, :, 0], scale[:, :, :, 1])
    offset = (p["dmin"].float()[..., None] * p["mn"].float()).view(rows, -1)
    x_lo, x_hi, x_sum = xs
    return (x_lo @ lo.T).addmm_(x_hi, hi.T).addmm_(x_sum, offset.T, alpha=-1)


def _chunk_fp8(p: Planes, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return (xs[0] @ fp8_to_float(p["q"]).T).mul_(p["scale"])


MATMULS: dict[str, tuple[Callable, Callable]] = {
    "Q8_0": (_prepare_q8_0, _chunk_q8_0),
    "Q4_0": (_prepare_q4, _chunk_q4_0),
    "Q4_1": (_prepare_q4, _chunk_q4_1),
    "Q4_K": (_prepare_q4_k, _chunk_q4_k),
    "FP8": (_prepare_q8_0, _chunk_fp8),
}
