"""A CPU interpreter of megakernel programs: the same per-SM queues and counters, PyTorch ops.

It runs a program the way the GPU does, one instruction at a time per SM, round-robin (or in a seeded
random order), and an instruction runs only once its counter has reached its target. If no SM can make
progress the program would deadlock on the GPU too: DeadlockError names what every SM waits for.

Each opcode's semantics mirror the kernel's: activations entering a matrix product are rounded to the
weight dtype, products accumulate in fp32, the residual stream is fp32, attention keeps its running max
in log2 units and the last split to arrive merges all splits in split order. In fp32 this matches the
reference executor to rounding; in bf16 it is what the kernel computes, up to summation order.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from megatier.config import ModelConfig
from megatier.executors.megakernel.isa import TILE, Instr, Op
from megatier.executors.megakernel.layout import Dims, StepBuffers
from megatier.executors.megakernel.schedule import Program
from megatier.kv.pages import KVCache
from megatier.weights import PackedWeights

LOG2E = math.log2(math.e)


class DeadlockError(RuntimeError):
    pass


def pack_argmax(value: float, index: int) -> int:
    """(logit, index) as one integer whose maximum is the largest logit, then the smallest index."""
    bits = int(torch.tensor(value, dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF
    ordered = bits ^ 0x80000000 if bits < 0x80000000 else ~bits & 0xFFFFFFFF
    key = (ordered << 32) | (0xFFFFFFFF - index)
    return key - (1 << 64) if key >= 1 << 63 else key  # stored as int64, compared as uint64


def unpack_index(key: int) -> int:
    return 0xFFFFFFFF - (key & 0xFFFFFFFF)


def _as_unsigned(key: int) -> int:
    return key & 0xFFFFFFFFFFFFFFFF


class Interpreter:
    def __init__(self, cfg: ModelConfig, w: PackedWeights, cache: KVCache, rope: torch.Tensor):
        self.cfg, self.w, self.cache, self.rope = cfg, w, cache, rope
        self.wdtype = w.qkv.dtype

    def run(self, program: Program, bufs: StepBuffers, order: str = "round_robin", seed: int = 0) -> None:
        """Execute one step, then finalize it as the last CTA to exit does."""
        queues = program.queues
        pc = [0] * len(queues)
        epoch = int(bufs.state[0])
        rng = random.Random(seed)
        while any(pc[s] < len(q) for s, q in enumerate(queues)):
            sms = list(range(len(queues)))
            if order == "random":
                rng.shuffle(sms)
            progressed = False
            for s in sms:
                if pc[s] < len(queues[s]) and self._ready(queues[s][pc[s]], bufs, epoch):
                    self.execute(queues[s][pc[s]], program, bufs, epoch)
                    pc[s] += 1
                    progressed = True
            if not progressed:
                raise DeadlockError(self._blocked(queues, pc, bufs, epoch))
        self._finalize(bufs)

    @staticmethod
    def _ready(instr: Instr, bufs: StepBuffers, epoch: int) -> bool:
        if instr.wait is None:
            return True
        return int(bufs.counters[instr.wait[0]]) >= instr.wait[1] * (epoch + 1)

    @staticmethod
    def _blocked(queues: list[list[Instr]], pc: list[int], bufs: StepBuffers, epoch: int) -> str:
        waits = []
        for s, q in enumerate(queues):
            if pc[s] < len(q):
                c, t = q[pc[s]].wait
                waits.append(f"SM {s} at #{q[pc[s]].index} {q[pc[s]].op.name}: counter {c} = {int(bufs.counters[c])}")
                waits[-1] += f" < {t * (epoch + 1)}"
        return "deadlock: " + "; ".join(waits[:8])

    @staticmethod
    def _signal(bufs: StepBuffers, sig: tuple[int, int] | None) -> int:
        if sig is None:
            return 0
        bufs.counters[sig[0]] += sig[1]
        return int(bufs.counters[sig[0]])

    def execute(self, instr: Instr, program: Program, bufs: StepBuffers, epoch: int) -> None:
        {
            Op.QKV: self._qkv,
            Op.ATTN: self._attn,
            Op.OPROJ: self._oproj,
            Op.GATEUP: self._gateup,
            Op.DOWN: self._down,
            Op.LMHEAD: self._lmhead,
        }[instr.op](instr, program, bufs, epoch)

    # -- helpers ----------------------------------------------------------------------------------

    def _norm_act(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of fp32 rows, times the norm weight, rounded to the weight dtype (the mma operand)."""
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return (x * r * weight.float()).to(self.wdtype).float()

    @staticmethod
    def _gemv(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """a [B, K] times each 16-row tile of w [rows, K] separately, so results do not depend on how
        tiles are grouped into instructions (the kernel's property, checked bitwise in tests)."""
        y = torch.cat([a @ w[t : t + TILE].float().T for t in range(0, w.shape[0], TILE)], dim=1)
        return y if bias is None else y + bias.float()

    @staticmethod
    def _silu_by_tile(g: torch.Tensor) -> torch.Tensor:
        """SiLU of each 16-column tile as its own contiguous tensor. torch's vectorized exp differs by an
        ULP between its full-vector and tail paths (AVX-512 vs AVX2 tails fall at other offsets), so a
        slice whose width depends on how tiles are grouped into instructions would change the logits."""
        return torch.cat([F.silu(g[:, t : t + TILE].contiguous()) for t in range(0, g.shape[1], TILE)], dim=1)

    def _embed_rows(self, bufs: StepBuffers) -> torch.Tensor:
        return self.w.embed[bufs.tokens.long()].float()

    # -- opcodes ----------------------------------------------------------------------------------

    def _qkv(self, instr: Instr, program: Program, bufs: StepBuffers, epoch: int) -> None:
        """Tiles of q|k|v rows; a head's results are finished (bias, q/k norm, RoPE, store) tile by tile,
        or once the whole head is done when q/k are normed."""
        d, w, layer = program.dims, self.w, instr.layer
        x = self._embed_rows(bufs) if layer == 0 else bufs.resid
        a = self._norm_act(x, w.input_norm[layer])
        head = torch.full((d.batch, d.head_dim), float("nan"))
        done: list[int] = []
        for t in range(*instr.args):
            j, dims = d.qkv_tile(t)
            rows = [j * d.head_dim + x for x in dims]
            bias = None if w.qkv_bias is None else w.qkv_bias[layer, rows]
            head[:, dims] = self._gemv(a, w.qkv[layer, rows], bias)
            done += dims
            if not d.qk_norm or len(done) == d.head_dim:
                self._finish_head(d, layer, j, head, sorted(done), bufs)
                done = []
        self._signal(bufs, instr.signal)

    def _finish_head(self, d: Dims, layer: int, j: int, y: torch.Tensor, dims: list[int], bufs: StepBuffers) -> None:
        kind = 0 if j < d.heads else (1 if j < d.heads + d.kv_heads else 2)
        y = y.clone()
        if kind < 2 and d.qk_norm:
            nw = (self.w.q_norm if kind == 0 else self.w.k_norm)[layer].float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps) * nw
        if kind < 2:
            cs = self.rope[bufs.pos.long()]  # [B, head_dim/2, 2]
            h = d.head_dim // 2
            lo, hi = y[:, :h], y[:, h:]
            y = torch.cat((lo * cs[..., 0] - hi * cs[..., 1], hi * cs[..., 0] + lo * cs[..., 1]), dim=-1)
        if kind == 0:
            bufs.q[:, [j * d.head_dim + x for x in dims]] = y[:, dims]
            return
        kvh = d.kv_head_of(j)
        for b in range(d.batch):
            p = int(bufs.pos[b])
            page = int(bufs.table[b, p // d.page_size])
            self.cache.kv[page, layer, kind - 1, kvh, p % d.page_size, dims] = y[b, dims].to(self.cache.kv.dtype)

    def _attn(self, instr: Instr, program: Program, bufs: StepBuffers, epoch: int) -> None:
        d, layer = program.dims, instr.layer
        b, kvh, s, nsplit = instr.args
        lo, hi = d.split_range(int(bufs.pos[b]) + 1, s)
        heads = slice(kvh * d.group * d.head_dim, (kvh + 1) * d.group * d.head_dim)
        q = bufs.q[b, heads].view(d.group, d.head_dim) * (d.head_dim**-0.5 * LOG2E)
        m = torch.full((d.group,), float("-inf"))
        lsum = torch.zeros(d.group)
        o = torch.zeros(d.group, d.head_dim)
        if hi > lo:
            positions = torch.arange(lo, hi)
            pages = bufs.table[b, positions // d.page_size].long()
            kv = self.cache.kv[pages, layer, :, kvh, positions % d.page_size].float()  # [T, 2, D]
            scores = q @ kv[:, 0].T  # [G, T], log2 units
            m = scores.max(-1).values
            p = torch.exp2(scores - m[:, None])
            lsum = p.sum(-1)
            o = p @ kv[:, 1]
        bufs.part_o[b, kvh, s] = o
        bufs.part_ml[b, kvh, s, :, 0] = m
        bufs.part_ml[b, kvh, s, :, 1] = lsum
        if self._signal(bufs, instr.signal) == instr.arrive_target * (epoch + 1):
            self._merge(d, b, kvh, nsplit, bufs)
            self._signal(bufs, (instr.done, 1))

    @staticmethod
    def _merge(d: Dims, b: int, kvh: int, nsplit: int, bufs: StepBuffers) -> None:
        m, lsum = bufs.part_ml[b, kvh, :nsplit, :, 0], bufs.part_ml[b, kvh, :nsplit, :, 1]  # [S, G]
        big = m.max(0).values
        scale = torch.where(m == float("-inf"), torch.zeros_like(m), torch.exp2(m - big))
        total = (lsum * scale).sum(0)
        out = (bufs.part_o[b, kvh, :nsplit] * scale[..., None]).sum(0) / total[:, None]  # [G, D]
        heads = slice(kvh * d.group * d.head_dim, (kvh + 1) * d.group * d.head_dim)
        bufs.attn_out[b, heads] = out.reshape(-1).to(bufs.attn_out.dtype)

    def _rows(self, instr: Instr, m: int) -> slice:
        return slice(instr.args[0] * TILE, min(instr.args[1] * TILE, m))

    def _oproj(self, instr: Instr, program: Program, bufs: StepBuffers, epoch: int) -> None:
        d, w, layer = program.dims, self.w, instr.layer
        rows = self._rows(instr, d.hidden)
        bias = None if w.o_bias is None else w.o_bias[layer, rows]
        y = self._gemv(bufs.attn_out.float(), w.o[layer, rows], bias)
        base = self._embed_rows(bufs)[:, rows] if layer == 0 else bufs.resid[:, rows]
        bufs.resid[:, rows] = base + y
        self._signal(bufs, instr.signal)

    def _gateup(self, instr: Instr, program: Program, bufs: StepBuffers, epoch: int) -> None:
        d, w, layer = program.dims, self.w, instr.layer
        rows = self._rows(instr, d.inter)
        up_rows = slice(d.inter + rows.start, d.inter + rows.stop)
        a = self._norm_act(bufs.resid, w.post_norm[layer])
        gb = ub = None
        if w.gate_up_bias is not None:
            gb, ub = w.gate_up_bias[layer, rows], w.gate_up_bias[layer, up_rows]
        g = self._gemv(a, w.gate_up[layer, rows], gb)
        u = self._gemv(a, w.gate_up[layer, up_rows], ub)
        bufs.act[:, rows] = (self._silu_by_tile(g) * u).to(bufs.act.dtype)
        self._signal(bufs, instr.signal)

    def _down(self, instr: Instr, program: Program, bufs: StepBuffers, epoch: int) -> None:
        d, w, layer = program.dims, self.w, instr.layer
        rows = self._rows(instr, d.hidden)
        bias = None if w.down_bias is None else w.down_bias[layer, rows]
        bufs.resid[:, rows] = bufs.resid[:, rows] + self._gemv(bufs.act.float(), w.down[layer, rows], bias)
        self._signal(bufs, instr.signal)

    def _lmhead(self, instr: Instr, program: Program, bufs: StepBuffers, epoch: int) -> None:
        d = program.dims
        rows = self._rows(instr, d.vocab)
        a = self._norm_act(bufs.resid, self.w.final_norm)
        logits = self._gemv(a, self.w.lm_head[rows], None)
        bufs.logits[:, rows] = logits
        for b in range(d.batch):
            i = int(logits[b].argmax())
            key = pack_argmax(float(logits[b, i]), rows.start + i)
            if _as_unsigned(key) > _as_unsigned(int(bufs.argmax[b])):
                bufs.argmax[b] = key
        self._signal(bufs, instr.signal)

    @staticmethod
    def _finalize(bufs: StepBuffers) -> None:
        """What the last CTA to exit does: feed the greedy token back and advance the step."""
        step = int(bufs.state[1])
        for b in range(bufs.tokens.shape[0]):
            token = unpack_index(int(bufs.argmax[b]))
            bufs.out_tokens[step % bufs.out_tokens.shape[0], b] = token
            bufs.tokens[b] = token
        bufs.pos += 1
        bufs.argmax.zero_()
        bufs.state[0] += 1
        bufs.state[1] += 1
