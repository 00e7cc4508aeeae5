"""Fused GEMV kernels for small decode batches: each weight streamed once, with the elementwise work
around it folded into its prologue and epilogue.

A decode step multiplies a few activation rows by every weight matrix; the weights are nearly all the
bytes, so each kernel must stream its matrix at close to the copy bandwidth, and norms, biases and
activations must not cost launches of their own. A program owns a block of output features for every
batch row and loops over K, software-pipelined (weights and activations staged through shared memory
`num_stages` deep), accumulating in fp32: with FMAs for one batch row, with tensor-core dots (batch
padded to 16) for more. Launched with PDL, a program first asks L2 for the start of its weight rows
(weights never depend on the previous kernel), then waits, so its weights stream while the previous
kernel drains.

RMSNorm as a prologue: rmsnorm(x) @ W^T = rsqrt(mean(x^2) + eps) * ((x * g) @ W^T). A program scales the
fp32 residual by the norm weight g as it streams it and multiplies its results by the row's rsqrt at the
end; the sum of squares comes from the same pass over x, so there is no norm kernel and no extra read.

Kernels here: `gemv_residual_add` (o and down projections: residual += x @ W^T + b, one writer per
element), `gemv_norm_silu` (gate|up: silu(gate) * up of the normed residual) and `gemv_norm_logits`
(final norm and LM head: fp32 logits and/or per-program argmax partials; see argmax.py). The qkv
projection with RoPE and the KV append is in gemv_qkv.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from megatier.kernels.decode_attention import dot_options
from megatier.kernels.pdl import use_pdl
from megatier.kernels.quant_gemm import FP8_UNIT, KIND_CODES, plane_args, weight_tile
from megatier.quant.blocks import QuantWeight

PREFETCH_BYTES = 16384  # per program: the weight bytes it asks L2 for before the PDL wait (0: none)


class GemvConfig(NamedTuple):
    block_n: int  # output features per program (pairs of features for the paired kernels)
    block_k: int
    num_warps: int
    num_stages: int


# Tuned configurations by (kernel, N, K, block_m), filled before graph capture (scripts/gpu_graph_check.py
# measures candidates on the device); anything missing gets `default_config`.
tuned: dict[tuple[str, int, int, int], GemvConfig] = {}


def block_m_for(num_rows: int) -> int:
    """1 (FMA path) for a single row, else the batch padded for tensor-core dots."""
    return 1 if num_rows == 1 else max(16, triton.next_power_of_2(num_rows))


def default_config(kind: str, n: int, k: int, block_m: int) -> GemvConfig:
    """Enough programs to fill the GPU several times and ~16 KiB of weights per pipeline stage; with
    several rows, activation tiles of at most 16 KiB (the normed kernels read the fp32 residual)."""
    if block_m == 1:
        block_n = 32 if kind == "logits" else 8
        block_k = 256 if kind == "logits" else (1024 if k >= 8192 else 512)
        return GemvConfig(block_n, min(block_k, max(16, triton.next_power_of_2(k))), 4, 4)
    block_n = 64 if kind == "logits" else 16
    rows = 2 * block_n if kind in ("qkv", "silu") else block_n
    block_k = min(8192 // rows, (8192 if kind == "residual" else 4096) // block_m)
    return GemvConfig(block_n, min(block_k, max(16, triton.next_power_of_2(k))), 4, 4)


def gemv_config(kind: str, n: int, k: int, block_m: int) -> GemvConfig:
    return tuned.get((kind, n, k, block_m)) or default_config(kind, n, k, block_m)


def prefetch_lines(rows_per_program: int, k: int, element_size: int) -> int:
    """128-byte lines of each weight row a program prefetches: PREFETCH_BYTES in all, a power of two
    (0 when PREFETCH_BYTES is 0: no prefetch)."""
    if PREFETCH_BYTES == 0:
        return 0
    per_row = max(1, PREFETCH_BYTES // (rows_per_program * 128))
    return min(triton.next_power_of_2(triton.cdiv(k * element_size, 128)), 1 << (per_row.bit_length() - 1))


@triton.jit
def prefetch_rows(w_ptr, rows, row_mask, stride_w, K, LINES: tl.constexpr):
    """Ask L2 for the first LINES 128-byte lines of each weight row: a hint nothing waits for. Called
    before the PDL wait, since weights never depend on the previous kernel."""
    element_bytes = w_ptr.dtype.element_ty.primitive_bitwidth // 8
    line = tl.arange(0, LINES) * 128
    row_ptrs = w_ptr.to(tl.pointer_type(tl.int8)) + rows.to(tl.int64)[:, None] * (stride_w * element_bytes)
    pred = (row_mask[:, None] & (line < K * element_bytes)[None, :]).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r",
        [row_ptrs + line[None, :], pred],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def matvec(
    x_ptr,
    stride_x,
    num_rows,
    norm_ptr,
    w_ptr,
    p1,
    p2,
    p3,
    p4,
    stride_w,
    rows_a,
    rows_b,
    row_mask,
    K,
    KIND: tl.constexpr,
    NORM: tl.constexpr,
    PAIR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """W[rows_a] @ x^T and (PAIR) W[rows_b] @ x^T as fp32 [BLOCK_N, BLOCK_M] tiles over the first num_rows
    rows of x [*, K] (row stride stride_x), and each x row's sum of squares [BLOCK_M]. With NORM, x is
    multiplied by norm_ptr [K] after its squares are summed. W is a plain matrix at w_ptr (KIND -1) or a
    QuantWeight's planes w_ptr, p1..p4 (KIND a quant_gemm.KIND_CODES value), decoded in registers."""
    wa_ptrs = w_ptr + rows_a.to(tl.int64)[:, None] * stride_w
    wb_ptrs = w_ptr + rows_b.to(tl.int64)[:, None] * stride_w
    if BLOCK_M == 1:
        # One row: elementwise FMAs into a [BLOCK_N, BLOCK_K] accumulator, reduced once at the end.
        acc_a = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_b = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        sq = tl.zeros([BLOCK_K], tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            w_mask = row_mask[:, None] & k_mask[None, :]
            x = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            if NORM:
                sq += x * x
                x *= tl.load(norm_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            wa = _tile(wa_ptrs, w_ptr, p1, p2, p3, p4, rows_a, k, w_mask, K, KIND, True)
            acc_a += wa.to(tl.float32) * x[None, :]
            if PAIR:
                wb = _tile(wb_ptrs, w_ptr, p1, p2, p3, p4, rows_b, k, w_mask, K, KIND, True)
                acc_b += wb.to(tl.float32) * x[None, :]
        out_a = tl.sum(acc_a, axis=1)[:, None]
        out_b = tl.sum(acc_b, axis=1)[:, None]
        sum_sq = tl.zeros([1], tl.float32) + tl.sum(sq, axis=0)
    else:
        # Several rows: tensor-core dots of the weight tile with the (padded) activation tile.
        m = tl.arange(0, BLOCK_M)
        x_mask = m < num_rows
        out_a = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        out_b = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        sum_sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            w_mask = row_mask[:, None] & k_mask[None, :]
            x_ptrs = x_ptr + m[:, None] * stride_x + k[None, :]
            x = tl.load(x_ptrs, mask=x_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            if NORM:
                sum_sq += tl.sum(x * x, axis=1)
                x *= tl.load(norm_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            wa = _tile(wa_ptrs, w_ptr, p1, p2, p3, p4, rows_a, k, w_mask, K, KIND, DOT_FP32)
            if DOT_FP32:
                x_t = tl.trans(x)
                out_a = tl.dot(wa.to(tl.float32), x_t, out_a, input_precision=DOT_PRECISION)
            else:
                x_t = tl.trans(x.to(wa.dtype))
                out_a = tl.dot(wa, x_t, out_a)
            if PAIR:
                wb = _tile(wb_ptrs, w_ptr, p1, p2, p3, p4, rows_b, k, w_mask, K, KIND, DOT_FP32)
                if DOT_FP32:
                    out_b = tl.dot(wb.to(tl.float32), x_t, out_b, input_precision=DOT_PRECISION)
                else:
                    out_b = tl.dot(wb, x_t, out_b)
    if KIND == 4:  # FP8: the per-channel scale, once per output feature
        out_a *= (tl.load(p1 + rows_a, mask=row_mask, other=0.0) * FP8_UNIT)[:, None]
        if PAIR:
            out_b *= (tl.load(p1 + rows_b, mask=row_mask, other=0.0) * FP8_UNIT)[:, None]
    return out_a, out_b, sum_sq


@triton.jit
def _tile(w_ptrs, q_ptr, p1, p2, p3, p4, rows, k, mask, K, KIND: tl.constexpr, FP32: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] weight tile: a plain matrix's as stored (w_ptrs: its rows' starts), a quantized
    one's decoded to fp32 (FP32: FMAs, fp32 dots), else to bf16 for 16-bit tensor-core dots (exact for
    FP8 codes)."""
    # One return: the compiler checks every return's type, even in branches a constexpr rules out.
    if KIND < 0:
        w = tl.load(w_ptrs + k[None, :], mask=mask, other=0.0)
    elif FP32:
        w = weight_tile(q_ptr, p1, p2, p3, p4, rows[:, None], k[None, :], mask, K, KIND)
    else:
        w = weight_tile(q_ptr, p1, p2, p3, p4, rows[:, None], k[None, :], mask, K, KIND).to(tl.bfloat16)
    return w


@triton.jit
def _residual_add_kernel(
    x_ptr,
    w_ptr,
    p1,
    p2,
    p3,
    p4,
    bias_ptr,
    residual_ptr,
    num_rows,
    N,
    K,
    stride_x,
    stride_w,
    stride_residual,
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if USE_PDL:
        if PREFETCH_LINES > 0:  # 0: no prefetch
            prefetch_rows(w_ptr, rows, row_mask, stride_w, K if KIND < 0 else stride_w, PREFETCH_LINES)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc, _, _ = matvec(
        x_ptr, stride_x, num_rows, x_ptr, w_ptr, p1, p2, p3, p4, stride_w, rows, rows, row_mask, K,
        KIND, False, False, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    m = tl.arange(0, BLOCK_M)
    ptrs = residual_ptr + m[None, :] * stride_residual + rows[:, None]
    mask = row_mask[:, None] & (m < num_rows)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _norm_silu_kernel(
    residual_ptr,
    norm_ptr,
    w_ptr,
    p1,
    p2,
    p3,
    p4,
    bias_ptr,
    out_ptr,
    num_rows,
    width,
    K,
    eps,
    stride_residual,
    stride_w,
    stride_out,
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    gate_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = gate_rows < width
    up_rows = gate_rows + width
    if USE_PDL:
        if PREFETCH_LINES > 0:  # 0: no prefetch
            prefetch_rows(w_ptr, gate_rows, row_mask, stride_w, K if KIND < 0 else stride_w, PREFETCH_LINES)
            prefetch_rows(w_ptr, up_rows, row_mask, stride_w, K if KIND < 0 else stride_w, PREFETCH_LINES)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    gate, up, sum_sq = matvec(
        residual_ptr, stride_residual, num_rows, norm_ptr, w_ptr, p1, p2, p3, p4, stride_w, gate_rows, up_rows,
        row_mask, K, KIND, True, True, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    inv_rms = tl.rsqrt(sum_sq / K + eps)[None, :]
    gate *= inv_rms
    up *= inv_rms
    if HAS_BIAS:
        gate += tl.load(bias_ptr + gate_rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        up += tl.load(bias_ptr + up_rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    m = tl.arange(0, BLOCK_M)
    mask = row_mask[:, None] & (m < num_rows)[None, :]
    tl.store(out_ptr + m[None, :] * stride_out + gate_rows[:, None], gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _norm_logits_kernel(
    residual_ptr,
    norm_ptr,
    w_ptr,
    p1,
    p2,
    p3,
    p4,
    logits_ptr,
    part_val_ptr,
    part_idx_ptr,
    num_rows,
    N,
    K,
    eps,
    stride_residual,
    stride_w,
    stride_logits,
    KIND: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    ARGMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if USE_PDL:
        if PREFETCH_LINES > 0:  # 0: no prefetch
            prefetch_rows(w_ptr, rows, row_mask, stride_w, K if KIND < 0 else stride_w, PREFETCH_LINES)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc, _, sum_sq = matvec(
        residual_ptr, stride_residual, num_rows, norm_ptr, w_ptr, p1, p2, p3, p4, stride_w, rows, rows, row_mask, K,
        KIND, True, False, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    logits = acc * tl.rsqrt(sum_sq / K + eps)[None, :]
    m = tl.arange(0, BLOCK_M)
    m_mask = m < num_rows
    if STORE_LOGITS:
        mask = row_mask[:, None] & m_mask[None, :]
        tl.store(logits_ptr + m[None, :] * stride_logits + rows[:, None], logits, mask=mask)
    if ARGMAX:
        # Greedy picks among logits rounded to the compute dtype, the norm weight's (as a bf16 model's
        # logits are), ties to the lowest index; stage 2 (argmax.py) reduces these partials the same way.
        rounded = logits.to(norm_ptr.dtype.element_ty).to(tl.float32)
        rounded = tl.where(row_mask[:, None], rounded, float("-inf"))
        best = tl.max(rounded, axis=0)
        index = tl.min(tl.where(rounded == best[None, :], rows[:, None], N), axis=0)
        num_parts = tl.num_programs(0)
        tl.store(part_val_ptr + m * num_parts + pid, best, mask=m_mask)
        tl.store(part_idx_ptr + m * num_parts + pid, index, mask=m_mask)


Matrix = torch.Tensor | QuantWeight


class WeightArgs(NamedTuple):
    """What a kernel needs of its weight matrix."""

    ptrs: list[torch.Tensor]  # w_ptr, p1..p4: a plain matrix five times, or a QuantWeight's planes
    stride: int  # elements between rows (of the q plane)
    row_bytes: int
    kind: int  # -1: plain; else a quant_gemm.KIND_CODES value
    dtype: torch.dtype  # what tensor-core dots run in


def weight_args(w: Matrix, dtype: torch.dtype) -> WeightArgs:
    """A plain matrix's dots run in its own dtype, a quantized one's in `dtype` (the compute dtype)."""
    if isinstance(w, QuantWeight):
        planes = plane_args(w)
        return WeightArgs(planes, planes[0].stride(0), planes[0].stride(0), KIND_CODES[w.kind], dtype)
    return WeightArgs([w] * 5, w.stride(0), w.shape[1] * w.element_size(), -1, w.dtype)


def _launch_options(kind: str, num_rows: int, w: Matrix, wa: WeightArgs, n: int, rows_per_block: int) -> dict:
    """Block sizes, warps, stages, prefetch depth, dot mode and PDL flags for one launch."""
    k = w.shape[1]
    block_m = block_m_for(num_rows)
    cfg = gemv_config(kind, n, k, block_m)
    pdl = use_pdl(w.device)
    return {
        "KIND": wa.kind,
        "BLOCK_M": block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "NUM_STAGES": cfg.num_stages,
        "PREFETCH_LINES": prefetch_lines(rows_per_block * cfg.block_n, wa.row_bytes, 1),
        **dot_options(wa.dtype),
        "USE_PDL": pdl,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "launch_pdl": pdl,
    }


def gemv_residual_add(x: torch.Tensor, w: Matrix, bias: torch.Tensor | None, residual: torch.Tensor) -> None:
    """residual [M, N] fp32 += x [M, K] @ w [N, K]^T + bias, in place (the o and down projections)."""
    n, k = w.shape
    wa = weight_args(w, x.dtype)
    opts = _launch_options("residual", x.shape[0], w, wa, n, 1)
    _residual_add_kernel[(triton.cdiv(n, opts["BLOCK_N"]),)](
        x, *wa.ptrs, x if bias is None else bias, residual, x.shape[0], n, k,
        x.stride(0), wa.stride, residual.stride(0), HAS_BIAS=bias is not None, **opts,
    )  # fmt: skip


def gemv_norm_silu(
    residual: torch.Tensor, norm: torch.Tensor, w: Matrix, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """silu(gate) * up of h = rmsnorm(residual) * norm, where w [2I, K] stacks gate | up rows and
    bias [2I] likewise: returns [M, I] in norm's dtype (the compute dtype)."""
    num_rows, k = residual.shape
    width = w.shape[0] // 2
    out = torch.empty((num_rows, width), dtype=norm.dtype, device=w.device)
    wa = weight_args(w, norm.dtype)
    opts = _launch_options("silu", num_rows, w, wa, width, 2)
    _norm_silu_kernel[(triton.cdiv(width, opts["BLOCK_N"]),)](
        residual, norm, *wa.ptrs, norm if bias is None else bias, out, num_rows, width, k, eps,
        residual.stride(0), wa.stride, out.stride(0), HAS_BIAS=bias is not None, **opts,
    )  # fmt: skip
    return out


def gemv_norm_logits(
    residual: torch.Tensor, norm: torch.Tensor, w: Matrix, eps: float, *, logits: bool, argmax: bool
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """The LM head over rmsnorm(residual) * norm: (fp32 logits [M, vocab] if `logits`, argmax partials
    (values [M, P] fp32, indices [M, P] int32, one per program) if `argmax`)."""
    num_rows, k = residual.shape
    vocab = w.shape[0]
    wa = weight_args(w, norm.dtype)
    opts = _launch_options("logits", num_rows, w, wa, vocab, 1)
    num_parts = triton.cdiv(vocab, opts["BLOCK_N"])
    out = torch.empty((num_rows, vocab), dtype=torch.float32, device=w.device) if logits else None
    part_val = torch.empty((num_rows, num_parts), dtype=torch.float32, device=w.device) if argmax else None
    part_idx = torch.empty((num_rows, num_parts), dtype=torch.int32, device=w.device) if argmax else None
    _norm_logits_kernel[(num_parts,)](
        residual, norm, *wa.ptrs, residual if out is None else out, residual if part_val is None else part_val,
        residual if part_idx is None else part_idx, num_rows, vocab, k, eps,
        residual.stride(0), wa.stride, 0 if out is None else out.stride(0),
        STORE_LOGITS=logits, ARGMAX=argmax, **opts,
    )  # fmt: skip
    return out, (part_val, part_idx) if argmax else None
