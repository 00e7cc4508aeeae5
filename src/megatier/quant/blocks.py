"""Quantized weight matrices kept in their block formats: GGUF Q8_0, Q4_0, Q4_1, Q4_K and FP8 (e4m3).

A `QuantWeight` stands for an [out_features, in_features] matrix and holds its blocks as planes, one
tensor per field of the block (scales, minimums, packed quants), each with one row per output feature,
so row slices, row gathers (the Q/K RoPE reorder, embedding lookups) and moves between devices are plain
tensor ops. A GGUF block's bytes are split into those planes once at load; the bits are GGUF's own, in
their order inside each block (Q4_K's packed 6-bit scales unpacked to one byte each, 16 bytes of 144 more
per 256 weights). `dequantize` reproduces `gguf.quants.dequantize` bit for bit; the matmuls call it on
row subsets only (embedding rows, one chunk), whole matrices are dequantized only when asked for
(quantization="none", the GPU executors' packing, tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatier.errors import MegatierError

# GGUF type name -> (weights per block, bytes per block); the FP8 format has no blocks along K.
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}
KINDS = (*GGUF_BLOCKS, "FP8")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass
class QuantWeight:
    """An [out_features, in_features] matrix in the block format `kind` (a name of KINDS).

    Planes by kind (N rows, K columns, B = K / block): Q8_0 d [N, B] fp16, q [N, K] int8; Q4_0 d, Q4_1 d
    and m [N, B] fp16, q [N, B, 16] uint8 (weight i of a block in the low nibble of byte i, weight 16 + i
    in its high nibble); Q4_K d, dmin [N, B] fp16, sc, mn [N, B, 8] uint8 (6-bit sub-block scales and
    minimums), q [N, B, 4, 32] uint8 (byte i of group g holds weight 64g + i low, 64g + 32 + i high); FP8
    q [N, K] float8_e4m3fn, scale [N] fp32 (one per output channel)."""

    kind: str
    shape: tuple[int, int]
    planes: dict[str, torch.Tensor]

    @property
    def device(self) -> torch.device:
        return next(iter(self.planes.values())).device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.planes.values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> QuantWeight:
        """On `device`; `dtype` (what plain weights are cast to) does not apply: the blocks stay as stored."""
        del dtype
        if device is None or torch.device(device) == self.device:
            return self
        return QuantWeight(self.kind, self.shape, {k: p.to(device) for k, p in self.planes.items()})

    def rows(self, start: int, end: int) -> QuantWeight:
        """Output features [start, end) as views."""
        end = min(end, self.shape[0])
        return QuantWeight(self.kind, (end - start, self.shape[1]), {k: p[start:end] for k, p in self.planes.items()})

    def take_rows(self, index: torch.Tensor) -> QuantWeight:
        """The output features `index` (a 1-D integer tensor), in that order."""
        planes = {k: p[index.to(p.device)] for k, p in self.planes.items()}
        return QuantWeight(self.kind, (int(index.numel()), self.shape[1]), planes)

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix, as gguf.quants.dequantize computes it (FP8: q * scale)."""
        return DEQUANTIZE[self.kind](self.planes).reshape(self.shape)


def cat_rows(parts: list[QuantWeight]) -> QuantWeight:
    """Matrices of one kind and width stacked along the output features (qkv, gate | up), contiguous."""
    kind, width = parts[0].kind, parts[0].shape[1]
    if any(p.kind != kind or p.shape[1] != width for p in parts):
        raise MegatierError(f"cat_rows: {[(p.kind, p.shape) for p in parts]} are not one kind and width")
    planes = {name: torch.cat([p.planes[name] for p in parts]) for name in parts[0].planes}
    return QuantWeight(kind, (sum(p.shape[0] for p in parts), width), planes)


# ---- from GGUF blocks ------------------------------------------------------------------------------


def from_gguf(kind: str, data: np.ndarray, shape: tuple[int, int], name: str) -> QuantWeight:
    """Split GGUF blocks (uint8 [N, bytes per row], as gguf's reader maps them) into planes."""
    block, size = GGUF_BLOCKS[kind]
    n, k = shape
    if k % block or data.shape != (n, k // block * size):
        raise MegatierError(f"tensor {name!r}: {kind} data of shape {data.shape} does not hold a {n}x{k} matrix")
    raw = torch.from_numpy(np.ascontiguousarray(data)).view(n, k // block, size)

    def f16(start: int) -> torch.Tensor:
        return raw[:, :, start : start + 2].contiguous().view(torch.float16)[..., 0]

    if kind == "Q8_0":
        return QuantWeight(kind, shape, {"d": f16(0), "q": raw[:, :, 2:].contiguous().view(torch.int8).view(n, k)})
    if kind == "Q4_0":
        return QuantWeight(kind, shape, {"d": f16(0), "q": raw[:, :, 2:].contiguous()})
    if kind == "Q4_1":
        return QuantWeight(kind, shape, {"d": f16(0), "m": f16(2), "q": raw[:, :, 4:].contiguous()})
    # Q4_K: d, dmin, 12 bytes of packed 6-bit scales and minimums, 128 bytes of quants.
    packed = raw[:, :, 4:16]
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat((low & 63, (high & 15) | ((low >> 6) << 4)), dim=-1)
    mn = torch.cat((mid & 63, (high >> 4) | ((mid >> 6) << 4)), dim=-1)
    q = raw[:, :, 16:].contiguous().view(n, k // block, 4, 32)
    return QuantWeight(kind, shape, {"d": f16(0), "dmin": f16(2), "sc": sc, "mn": mn, "q": q})


# ---- FP8 (e4m3), one scale per output channel ----------------------------------------------------


def quantize_fp8(w: torch.Tensor, rows_at_once: int = 4096) -> QuantWeight:
    """A float matrix as FP8 with per-row scales amax / 448 (round to nearest), a few rows at a time so
    no fp32 copy of a large bf16 matrix is made. An all-zero row gets scale 1."""
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    for start in range(0, n, rows_at_once):
        part = w[start : start + rows_at_once].float()
        s = part.abs().amax(dim=1) / FP8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start : start + rows_at_once] = (part / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        scale[start : start + rows_at_once] = s
    return QuantWeight("FP8", (n, k), {"q": q, "scale": scale})


def fp8_from_checkpoint(weight: torch.Tensor, scale: torch.Tensor, name: str) -> QuantWeight:
    """A pre-quantized FP8 weight and its `weight_scale` as vLLM reads them: one scale per tensor ([] or
    [1]) or per output channel ([N] or [N, 1]); block-wise scales ([N / b, K / b]) are not supported."""
    n, k = weight.shape
    if weight.dtype != torch.float8_e4m3fn:
        raise MegatierError(f"tensor {name!r}: FP8 weights must be float8_e4m3fn, got {weight.dtype}")
    if scale.numel() == 1:
        per_row = scale.reshape(1).float().expand(n).contiguous()
    elif tuple(scale.shape) in ((n,), (n, 1)):
        per_row = scale.reshape(n).float()
    else:
        raise MegatierError(
            f"tensor {name!r}: weight_scale of shape {tuple(scale.shape)} fits neither per-tensor ([1]) nor "
            f"per-channel ([{n}, 1]) scales of a {n}x{k} weight"
        )
    return QuantWeight("FP8", (n, k), {"q": weight, "scale": per_row})


# ---- dequantization (exact) ------------------------------------------------------------------------


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit quants [..., n] -> [..., 2, n] (low nibbles, then high), as uint8."""
    return torch.stack((q & 15, q >> 4), dim=-2)


def _dequantize_q8_0(p: dict[str, torch.Tensor]) -> torch.Tensor:
    q = p["q"].view(p["q"].shape[0], -1, 32)
    return q.float() * p["d"].float()[..., None]


def _dequantize_q4_0(p: dict[str, torch.Tensor]) -> torch.Tensor:
    q = nibbles(p["q"]).flatten(-2).to(torch.int8) - 8
    return p["d"].float()[..., None] * q.float()


def _dequantize_q4_1(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return p["d"].float()[..., None] * nibbles(p["q"]).flatten(-2).float() + p["m"].float()[..., None]


def _dequantize_q4_k(p: dict[str, torch.Tensor]) -> torch.Tensor:
    n, blocks = p["d"].shape
    scale = (p["d"].float()[..., None] * p["sc"].float())[..., None]  # [N, B, 8, 1]
    offset = (p["dmin"].float()[..., None] * p["mn"].float())[..., None]
    q = nibbles(p["q"]).view(n, blocks, 8, 32).float()  # sub-block 2g + h: group g, nibble h
    return scale * q - offset


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> fp32, exactly, ten times faster on CPU than torch's own cast: the sign and the
    seven exponent/mantissa bits move into bfloat16's places (s eeee mmm -> s 0000eeee mmm0000), which
    reads as the same number times 2^-120, subnormals included."""
    bits = q.view(torch.int8).to(torch.int16).bitwise_left_shift_(4).bitwise_and_(-30736)  # 0x87F0
    return bits.view(torch.bfloat16).float().mul_(2.0**120)


def _dequantize_fp8(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return fp8_to_float(p["q"]) * p["scale"][:, None]


DEQUANTIZE = {
    "Q8_0": _dequantize_q8_0,
    "Q4_0": _dequantize_q4_0,
    "Q4_1": _dequantize_q4_1,
    "Q4_K": _dequantize_q4_k,
    "FP8": _dequantize_fp8,
}
