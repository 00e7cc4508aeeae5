"""Token embeddings straight into the fp32 residual stream that a fused decode step starts from."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatier.kernels.pdl import use_pdl


@triton.jit
def _embed_kernel(
    tokens_ptr, embed_ptr, out_ptr, hidden, stride_embed, stride_out, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.load(tokens_ptr + row).to(tl.int64)
    mask = cols < hidden
    values = tl.load(embed_ptr + token * stride_embed + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, values.to(tl.float32), mask=mask)


def embed_rows(tokens: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """tokens [M] int32, embed [vocab, hidden] -> embed[tokens] as fp32 [M, hidden]."""
    num_rows, hidden = tokens.shape[0], embed.shape[1]
    out = torch.empty((num_rows, hidden), dtype=torch.float32, device=embed.device)
    block = min(1024, triton.next_power_of_2(hidden))
    pdl = use_pdl(embed.device)
    _embed_kernel[(num_rows, triton.cdiv(hidden, block))](
        tokens, embed, out, hidden, embed.stride(0), out.stride(0), BLOCK=block, USE_PDL=pdl, launch_pdl=pdl
    )
    return out
