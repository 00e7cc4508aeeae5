"""RMSNorm fused with the residual add, over an fp32 residual stream.

Each layer ends by adding its output to the residual and normalizing the sum for the next matmul; one
kernel does both in one pass: residual (fp32, updated in place) += x, then returns
rmsnorm(residual) * weight in x's dtype. Keeping the residual in fp32 costs a few KiB per token and
removes the bf16 rounding that a bf16 residual stream adds at every layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.pdl import use_pdl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    num_cols,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    ADD: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    total = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        total += tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
    tl.store(residual_ptr + row * stride_residual + cols, total, mask=mask)
    inv_rms = tl.rsqrt(tl.sum(total * total, axis=0) / num_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, total * inv_rms * weight, mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, add: bool = True
) -> torch.Tensor:
    """x [T, N] (any float dtype), residual [T, N] fp32, weight [N].

    residual becomes residual + x (just x when add=False, to start the stream); returns
    rmsnorm(residual) * weight [T, N] in x's dtype."""
    num_rows, num_cols = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(num_cols)
    pdl = use_pdl(x.device)
    if num_rows:
        _add_rms_norm_kernel[(num_rows,)](
            x,
            residual,
            weight,
            out,
            num_cols,
            eps,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            ADD=add,
            BLOCK=block,
            USE_PDL=pdl,
            num_warps=max(1, min(16, block // 256)),
            launch_pdl=pdl,
        )
    return out
