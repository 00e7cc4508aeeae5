"""The megakernel's instruction set: what one SM is told to do, encoded as 16 int32 words.

Each instruction is one fused operation over a contiguous piece of the step (a head, a range of 16-row
weight tiles, one attention split). It names at most one counter to wait for and one to signal, so the
kernel stays generic and Python owns the dependency graph (schedule.py). Counter targets are per step;
the kernel multiplies them by (epoch + 1) because counters only ever grow between resets.

Word layout (the same indices are emitted into the CUDA build as #defines, see `c_defines`):

    0 opcode   1 layer   2-5 args (by opcode, below)   6 wait counter   7 wait target
    8 signal counter   9 signal amount   10 arrival target (ATTN)   11 global index
    12 done counter (ATTN: the last split to arrive signals it by 1)   13-15 zero

Args: ATTN (sequence b, kv head, split s, splits S); QKV, OPROJ, GATEUP, DOWN, LMHEAD (first tile, end
tile). A counter of -1 means none.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

WORDS = 16
STAMPS = 6  # timeline stamps per instruction (timeline.py)
TILE = 16  # rows of a weight tile; the kernel's tensor-core fragment height
NONE = -1


class Op(IntEnum):
    NOOP = 0
    QKV = 1  # RMSNorm + 16-row tiles of q|k|v + bias + q/k norm + RoPE; writes q or appends K/V
    ATTN = 2  # one split of one (sequence, kv head); the last split to finish merges all splits
    OPROJ = 3  # O-projection of merged attention + residual
    GATEUP = 4  # RMSNorm + gate and up rows + SiLU(gate) * up
    DOWN = 5  # down-projection + residual
    LMHEAD = 6  # final RMSNorm + LM head rows + running argmax


FIELDS = {
    "OP": 0,
    "LAYER": 1,
    "A0": 2,
    "A1": 3,
    "A2": 4,
    "A3": 5,
    "WAIT_CTR": 6,
    "WAIT_TARGET": 7,
    "SIG_CTR": 8,
    "SIG_AMOUNT": 9,
    "ARRIVE_TARGET": 10,
    "INDEX": 11,
    "DONE_CTR": 12,
}


@dataclass(frozen=True)
class Instr:
    """One instruction. `wait`/`signal` are (counter, per-step amount) or None."""

    op: Op
    layer: int = 0
    args: tuple[int, ...] = ()
    wait: tuple[int, int] | None = None
    signal: tuple[int, int] | None = None
    arrive_target: int = 0  # ATTN: number of splits that signal the same arrival counter
    done: int = NONE  # ATTN: counter the last-arriving split signals after merging
    index: int = 0  # position in the program's global order (diagnostics, timeline)

    def encode(self) -> list[int]:
        words = [0] * WORDS
        words[FIELDS["OP"]] = int(self.op)
        words[FIELDS["LAYER"]] = self.layer
        for i, a in enumerate(self.args):
            words[FIELDS["A0"] + i] = a
        words[FIELDS["WAIT_CTR"]], words[FIELDS["WAIT_TARGET"]] = self.wait or (NONE, 0)
        words[FIELDS["SIG_CTR"]], words[FIELDS["SIG_AMOUNT"]] = self.signal or (NONE, 0)
        words[FIELDS["ARRIVE_TARGET"]] = self.arrive_target
        words[FIELDS["INDEX"]] = self.index
        words[FIELDS["DONE_CTR"]] = self.done
        return words

    @classmethod
    def decode(cls, words: list[int]) -> Instr:
        op = Op(words[FIELDS["OP"]])
        nargs = {Op.NOOP: 0, Op.ATTN: 4}.get(op, 2)
        wait = (words[FIELDS["WAIT_CTR"]], words[FIELDS["WAIT_TARGET"]])
        signal = (words[FIELDS["SIG_CTR"]], words[FIELDS["SIG_AMOUNT"]])
        return cls(
            op=op,
            layer=words[FIELDS["LAYER"]],
            args=tuple(words[FIELDS["A0"] : FIELDS["A0"] + nargs]),
            wait=None if wait[0] == NONE else wait,
            signal=None if signal[0] == NONE else signal,
            arrive_target=words[FIELDS["ARRIVE_TARGET"]],
            index=words[FIELDS["INDEX"]],
            done=words[FIELDS["DONE_CTR"]],
        )


def encode_queues(queues: list[list[Instr]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-SM queues -> (int32 [num_sms, max_len, WORDS] padded with NOOP, int32 [num_sms] lengths)."""
    width = max((len(q) for q in queues), default=0) or 1
    words = torch.zeros((len(queues), width, WORDS), dtype=torch.int32)
    for sm, queue in enumerate(queues):
        if queue:
            words[sm, : len(queue)] = torch.tensor([i.encode() for i in queue], dtype=torch.int32)
    lengths = torch.tensor([len(q) for q in queues], dtype=torch.int32)
    return words, lengths


@dataclass(frozen=True)
class Counters:
    """Where each counter lives in the one uint32 counter array of a step.

    arrive[l][sequence][kv head], then per layer qkv_done, attn_done, oproj_done, gateup_done, down_done,
    then `exit` (every CTA adds 1 when its queue is done; the last one finalizes the step).
    """

    layers: int
    batch: int
    kv_heads: int

    def arrive(self, layer: int, b: int, kvh: int) -> int:
        return (layer * self.batch + b) * self.kv_heads + kvh

    def _phase(self, k: int, layer: int) -> int:
        return self.layers * self.batch * self.kv_heads + k * self.layers + layer

    def qkv_done(self, layer: int) -> int:
        return self._phase(0, layer)

    def attn_done(self, layer: int) -> int:
        return self._phase(1, layer)

    def oproj_done(self, layer: int) -> int:
        return self._phase(2, layer)

    def gateup_done(self, layer: int) -> int:
        return self._phase(3, layer)

    def down_done(self, layer: int) -> int:
        return self._phase(4, layer)

    @property
    def exit(self) -> int:
        return self._phase(5, 0)

    @property
    def size(self) -> int:
        return self.exit + 1


def c_defines() -> dict[str, int]:
    """Field indices and opcodes for the CUDA source, so both sides read one definition."""
    out = {f"F_{name}": idx for name, idx in FIELDS.items()}
    out |= {f"OP_{op.name}": int(op) for op in Op}
    out |= {"WORDS": WORDS, "TILE": TILE, "STAMPS": STAMPS}
    return out
