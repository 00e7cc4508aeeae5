"""The CPU backend: the reference model with its decode hot spots on the host's C kernels.

A decode step of a small model on a few cores is mostly not the weights: the reference executor calls
seven matmuls a layer (each a ctypes call with its own setup) and gathers every sequence's pages into
fp32 copies for torch's attention. Here the matrices that share an input are stacked once at load (q|k|v
and gate|up: four matmuls a layer, and the layer's own matrices become row views of the stacked one, so
no weight is stored twice), and decode attention reads the pages in place with the DRAM tier's C kernel
(kv/cpu_attention.c: one call a layer, each page read once for its GQA group). An fp32 decode step
whose matrices are all in the C matmul's formats runs every layer in one C call (cpu_step.c, `HostStep`).
Prompt chunks run the reference's layer loop with torch's fused attention (scaled_dot_product_attention)
in place of its full score matrices. Where a C kernel is unavailable the reference's torch path runs, so
results stay the reference's up to fp32 summation order.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megatier import cbuild
from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor, linear, rms_norm, rope_cos_sin
from megatier.kv import cpu_attention as ca
from megatier.kv.pages import KVCache
from megatier.kv.store import KVStore, LayerKV
from megatier.parallel import Shard
from megatier.quant import cmatmul
from megatier.quant import cpu as quant_cpu
from megatier.quant.blocks import QuantWeight, cat_rows
from megatier.weights import LayerWeights, Matrix, ModelWeights

log = logging.getLogger(__name__)


@dataclass
class Stacked:
    """Matrices that read the same input, as one matrix (and bias) whose output splits into theirs."""

    matrix: Matrix
    bias: torch.Tensor | None
    sizes: list[int]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(linear(x, self.matrix, self.bias).split(self.sizes, dim=-1))


def stack(matrices: list[Matrix], biases: list[torch.Tensor | None]) -> Stacked | None:
    """The stacked form of `matrices`, or None where their formats differ (a GGUF may mix block types)."""
    quantized = [isinstance(m, QuantWeight) for m in matrices]
    if any(quantized):
        if not all(quantized) or len({(m.kind, m.shape[1]) for m in matrices}) != 1:
            return None
        matrix: Matrix = cat_rows(matrices)
    elif len({(m.dtype, m.shape[1]) for m in matrices}) == 1:
        matrix = torch.cat(matrices)
    else:
        return None
    sizes = [m.shape[0] for m in matrices]
    bias = None
    if any(b is not None for b in biases):
        like = next(b for b in biases if b is not None)
        bias = torch.cat([like.new_zeros(n) if b is None else b for b, n in zip(biases, sizes, strict=True)])
    return Stacked(matrix, bias, sizes)


def _row_views(stacked: Stacked) -> list[Matrix]:
    """Each original matrix as rows of the stacked one (so only the stacked copy is kept)."""
    views, start = [], 0
    for n in stacked.sizes:
        m = stacked.matrix
        views.append(m.rows(start, start + n) if isinstance(m, QuantWeight) else m[start : start + n])
        start += n
    return views


class CpuExecutor(ReferenceExecutor):
    name = "cpu"

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, cache: KVStore, shard: Shard | None = None):
        if cache.device.type != "cpu":
            raise MegatierError(f"backend 'cpu' runs on the host; the KV cache is on {cache.device.type}")
        super().__init__(cfg, weights, cache=cache, shard=shard)
        self.qkv: dict[int, Stacked] = {}
        self.gate_up: dict[int, Stacked] = {}
        for layer in self.w.layers:
            qkv = stack([layer.q_proj, layer.k_proj, layer.v_proj], [layer.q_bias, layer.k_bias, layer.v_bias])
            if qkv is not None:
                layer.q_proj, layer.k_proj, layer.v_proj = _row_views(qkv)
                self.qkv[id(layer)] = qkv
            gate_up = stack([layer.gate_proj, layer.up_proj], [layer.gate_bias, layer.up_bias])
            if gate_up is not None:
                layer.gate_proj, layer.up_proj = _row_views(gate_up)
                self.gate_up[id(layer)] = gate_up
        self.in_place_attention = ca.load_library() is not None and self.dtype in (torch.float32, torch.bfloat16)
        self._lists: tuple[torch.Tensor, torch.Tensor, tuple[np.ndarray, ...]] | None = None
        self.host_steps: dict[int, HostStep] = {}
        self.one_call_off = self._one_call_off()
        if self.one_call_off is not None:
            log.info("backend cpu: decode runs layer by layer, not in one C call (%s)", self.one_call_off)

    def _one_call_off(self) -> str | None:
        """Why decode cannot run as one C call (cpu_step.c), or None when it can."""
        if self.shard is not None:
            return "tensor parallel"
        if not isinstance(self.cache, KVCache):
            return "a tiered KV store"
        if self.dtype != torch.float32 or self.cache.dtype != torch.float32:
            return f"dtype {str(self.dtype).removeprefix('torch.')}: the one-call step is fp32"
        if self.cfg.qk_norm:
            return "q/k norms"
        for layer in self.w.layers:
            lid = id(layer)
            if lid not in self.qkv or lid not in self.gate_up:
                return "a layer's q|k|v or gate|up matrices are in different formats"
            mats = (self.qkv[lid].matrix, layer.o_proj, self.gate_up[lid].matrix, layer.down_proj)
            if not all(isinstance(m, QuantWeight) and cmatmul.usable(m) for m in mats):
                return "matrices not all in the C matmul's block formats"
        if ca.load_library() is None:
            return "the C attention kernel is unavailable"
        return step_library()[1]

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        if self.one_call_off is not None or not batch.is_decode():
            return super().forward(batch)
        step = self.host_steps.get(batch.num_seqs)
        if step is None:
            step = self.host_steps[batch.num_seqs] = HostStep(self, batch.num_seqs)
        h = rms_norm(step.run(self, batch), self.w.final_norm, self.cfg.rms_norm_eps)
        return linear(h, self.w.lm_head, None).float()

    def _project_qkv(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stacked = self.qkv.get(id(layer))
        return super()._project_qkv(layer, h) if stacked is None else tuple(stacked(h))

    def _mlp_hidden(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        stacked = self.gate_up.get(id(layer))
        if stacked is None:
            return super()._mlp_hidden(layer, h)
        gate, up = stacked(h)
        return F.silu(gate) * up

    def _causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """A prompt chunk's attention by torch's fused CPU kernel: the reference's form materializes every
        score (5x slower at a 256-token chunk over 6000 keys), this one streams them; same mask."""
        mask = torch.arange(k.shape[0])[None, :] <= torch.arange(start, start + q.shape[0])[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True
        )
        return out[0].transpose(0, 1)

    def hbm_attention(self, q: torch.Tensor, where: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.in_place_attention or where.pool.device.type != "cpu":
            return super().hbm_attention(q, where)
        offsets, pages, rows = self._page_lists(where)
        out, lse = ca.cpu_attention(
            q, where.pool[:, where.layer], offsets, pages, rows, self.cfg.head_dim**-0.5, impl="c"
        )
        return out.to(q.dtype), lse

    def _page_lists(self, where: LayerKV) -> tuple[np.ndarray, ...]:
        """(offsets, pages, rows) of the C kernel for these tables and lengths; every layer of a step shares
        one tables and one lens tensor, so they are built once a step."""
        cached = self._lists
        if cached is not None and cached[0] is where.tables and cached[1] is where.lens:
            return cached[2]
        size = self.page_size
        lens = where.lens.numpy().astype(np.int64)
        counts = -(-lens // size)
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        taken = np.arange(where.tables.shape[1])[None, :] < counts[:, None]
        pages = np.ascontiguousarray(where.tables.numpy()[taken], dtype=np.int32)
        rows = np.full(len(pages), size, dtype=np.int32)
        full = counts > 0
        rows[offsets[1:][full] - 1] = lens[full] - (counts[full] - 1) * size
        lists = (offsets, pages, rows)
        self._lists = (where.tables, where.lens, lists)
        return lists


class StepJob(ctypes.Structure):
    """step_t of cpu_step.c, field for field."""

    _fields_ = [
        *((name, ctypes.c_int32) for name in ("layers", "M", "hidden", "heads", "kv_heads", "D", "inter")),
        ("eps", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("x", "h", "qkv", "q", "attn", "tmp", "gu", "act", "cos", "sin")),
        *(
            (name, ctypes.c_void_p)
            for name in ("input_norm", "post_norm", "qkv_bias", "o_bias", "gu_bias", "down_bias")
        ),
        ("kv", ctypes.c_void_p),
        ("kv_row", ctypes.c_void_p),
        ("layer_stride", ctypes.c_int64),
        ("v_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
        ("matmul_jobs", ctypes.c_void_p),
        ("attend_jobs", ctypes.c_void_p),
        ("matmul", ctypes.c_void_p),
        ("attend", ctypes.c_void_p),
    ]


_step_lib: ctypes.CDLL | None = None
_step_error: str | None = None


def step_library() -> tuple[ctypes.CDLL | None, str | None]:
    """cpu_step.c, built on first use; (None, why) where it cannot be."""
    global _step_lib, _step_error
    if _step_lib is None and _step_error is None:
        _step_lib, _step_error = cbuild.build("cpu_step", Path(__file__).with_name("cpu_step.c"))
        if _step_lib is not None and _step_lib.step_size() != ctypes.sizeof(StepJob):
            raise RuntimeError("StepJob does not match step_t in cpu_step.c")
    return _step_lib, _step_error


def _pointers(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


class HostStep:
    """The buffers and prepared jobs of cpu_step.c's decode_layers for batches of `m` rows: built once per
    batch size, then each step only writes its inputs (tokens' embeddings, rotary tables, K/V rows, page
    lists) into them."""

    def __init__(self, ex: CpuExecutor, m: int):
        cfg, w, pool = ex.cfg, ex.w, ex.cache.kv
        d, qs, ks = cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        inter = w.layers[0].gate_proj.shape[0]

        def buf(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32)

        self.m = m
        self.x, self.h, self.qkv, self.q = (
            buf(m, cfg.hidden_size),
            buf(m, cfg.hidden_size),
            buf(m, qs + 2 * ks),
            buf(m, cfg.num_heads, d),
        )
        self.attn, self.lse, self.tmp = buf(m, cfg.num_heads, d), buf(m, cfg.num_heads), buf(m, cfg.hidden_size)
        self.gu, self.act, self.cos, self.sin = buf(m, 2 * inter), buf(m, inter), buf(m, d), buf(m, d)
        self.kv_row = np.zeros(m, dtype=np.int64)
        self.offsets = np.zeros(m + 1, dtype=np.int64)
        self.pages = np.zeros(ex.cache.num_pages, dtype=np.int32)
        self.rows = np.zeros(ex.cache.num_pages, dtype=np.int32)
        attn_in = self.attn.view(m, qs)
        self.matmuls: list[tuple[cmatmul.QJob, QuantWeight]] = []
        self.attends: list[ca.AttendJob] = []
        for i, layer in enumerate(w.layers):
            lid = id(layer)
            for x, mat, y in (
                (self.h, ex.qkv[lid].matrix, self.qkv),
                (attn_in, layer.o_proj, self.tmp),
                (self.h, ex.gate_up[lid].matrix, self.gu),
                (self.act, layer.down_proj, self.tmp),
            ):
                self.matmuls.append((cmatmul.make_job(x, mat, y), mat))
            self.attends.append(
                ca.make_job(
                    self.q, pool[:, i], self.offsets, self.pages, self.rows, d**-0.5, self.attn, self.lse, spin_us=1.0
                )
            )
        layers = w.layers
        self._keep = [
            _pointers([layer.input_norm for layer in layers]),
            _pointers([layer.post_norm for layer in layers]),
            _pointers([ex.qkv[id(layer)].bias for layer in layers]),
            _pointers([layer.o_bias for layer in layers]),
            _pointers([ex.gate_up[id(layer)].bias for layer in layers]),
            _pointers([layer.down_bias for layer in layers]),
            (ctypes.c_void_p * len(self.matmuls))(*[ctypes.addressof(j) for j, _ in self.matmuls]),
            (ctypes.c_void_p * len(self.attends))(*[ctypes.addressof(j) for j in self.attends]),
        ]
        ptr = ctypes.addressof
        self.job = StepJob(
            len(layers), m, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, d, inter, cfg.rms_norm_eps,
            *(t.data_ptr() for t in (self.x, self.h, self.qkv, self.q, self.attn, self.tmp, self.gu, self.act, self.cos, self.sin)),
            *(ptr(a) for a in self._keep[:6]),
            pool.data_ptr(), self.kv_row.ctypes.data, pool.stride(1), pool.stride(2), pool.stride(3),
            ptr(self._keep[6]), ptr(self._keep[7]), cmatmul.qmatmul_fn(), ca.host_fn(),
        )  # fmt: skip

    def run(self, ex: CpuExecutor, batch: StepBatch) -> torch.Tensor:
        """The decoder layers of one decode step; returns the residual stream [m, hidden] after them."""
        size, pool = ex.page_size, ex.cache.kv
        pos = np.asarray(batch.context_lens, dtype=np.int64) - 1
        tables = batch.page_tables
        pages_now = np.fromiter((t[p // size] for t, p in zip(tables, pos, strict=True)), np.int64, len(tables))
        self.kv_row[:] = pages_now * pool.stride(0) + (pos % size) * pool.stride(4)
        cos, sin = rope_cos_sin(ex.inv_freq, torch.from_numpy(pos), torch.float32)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        lens = pos + 1
        counts = -(-lens // size)
        self.offsets[1:] = np.cumsum(counts)
        n = int(self.offsets[-1])
        self.pages[:n] = np.fromiter((p for t, c in zip(tables, counts, strict=True) for p in t[:c]), np.int32, n)
        self.rows[:n] = size
        self.rows[self.offsets[1:] - 1] = lens - (counts - 1) * size
        self.x.copy_(quant_cpu.embedding(batch.token_tensor(ex.device), ex.w.embed, torch.float32))
        step_library()[0].decode_layers(ctypes.byref(self.job))
        for job, mat in self.matmuls:
            cmatmul.check_job(job, mat)
        for job in self.attends:
            ca.check_job(job)
        return self.x
