"""SiLU(gate) * up on the output of the stacked gate|up projection: one pass instead of three."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.pdl import use_pdl


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr, out_ptr, width, stride_gate_up, stride_out, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    mask = cols < width
    gate = tl.load(gate_up_ptr + row * stride_gate_up + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gate_up + width + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, gate * tl.sigmoid(gate) * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (columns gate | up) -> silu(gate) * up [T, I] in the same dtype."""
    num_rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_rows, width), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(width))
    pdl = use_pdl(gate_up.device)
    if num_rows:
        _silu_mul_kernel[(num_rows, triton.cdiv(width, block))](
            gate_up, out, width, gate_up.stride(0), out.stride(0), BLOCK=block, USE_PDL=pdl, launch_pdl=pdl
        )
    return out
