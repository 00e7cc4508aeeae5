"""Build one decode step as a program: the instruction DAG, its assignment to SMs, per-SM queues.

Phases per layer: QKV -> ATTN (one instruction per sequence, kv head and split) -> OPROJ -> GATEUP ->
DOWN, then LMHEAD. The tiled phases are cut into contiguous ranges of 16-row weight tiles, one
instruction per SM that gets any (QKV ranges cover whole heads when q/k are RMS-normed). Dependencies go through counters (isa.Counters): an instruction
waits until a counter reaches the sum of everything signalled into it, i.e. until all of its producers
have finished. The global order lists phases in dependency order; every SM's queue is a subsequence of
it, so with all CTAs resident the earliest unfinished instruction can always run (no deadlock).

Assignment strategies: "round_robin" (each phase spread evenly, a cursor rotating over the SMs; the
default, measured fastest on an H200), "balanced" (each phase even, remainders to the SMs with the
fewest bytes so far) and "random" (seeded, for tests). Numerics do not depend on the assignment: each output element is computed by the same code in
the same order whichever SM runs it, so logits are bitwise identical across strategies.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from megatier.executors.megakernel.isa import TILE, Instr, Op, encode_queues
from megatier.executors.megakernel.layout import ATTN_CHUNK, Dims

STRATEGIES = ("round_robin", "balanced", "random")
INSTR_OVERHEAD_BYTES = 16 * 1024  # fixed cost of starting an instruction, in bytes of weight streaming


class ScheduleError(Exception):
    """A program that could deadlock, race, or compute the wrong thing."""


@dataclass
class Program:
    dims: Dims
    num_sms: int
    instrs: list[Instr]  # the global order
    queues: list[list[Instr]]  # per SM, each a subsequence of `instrs`

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_queues(self.queues)


def _tile_phases(d: Dims) -> list[tuple[Op, int, int]]:
    """(op, tiles, bytes per tile) of the tiled phases of one layer."""
    w = 2  # bf16 bytes
    return [
        (Op.OPROJ, d.hidden_tiles, TILE * d.q_size * w),
        (Op.GATEUP, d.inter_tiles, 2 * TILE * d.hidden * w),
        (Op.DOWN, d.hidden_tiles, TILE * d.inter * w),
    ]


class _Assigner:
    """Hands out SMs for indivisible items and contiguous tile counts for tiled phases."""

    def __init__(self, strategy: str, num_sms: int, seed: int):
        if strategy not in STRATEGIES:
            raise ScheduleError(f"unknown schedule strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        self.strategy, self.n = strategy, num_sms
        self.load = [0] * num_sms  # bytes so far per SM (balanced)
        self.cursor = 0  # next SM (round_robin)
        self.rng = random.Random(seed)

    def item(self, cost: int) -> int:
        if self.strategy == "balanced":
            sm = min(range(self.n), key=lambda s: (self.load[s], s))
            self.load[sm] += cost + INSTR_OVERHEAD_BYTES
            return sm
        if self.strategy == "round_robin":
            sm, self.cursor = self.cursor, (self.cursor + 1) % self.n
            return sm
        return self.rng.randrange(self.n)

    def ranges(self, tiles: int, cost: int, unit: int = 1) -> list[tuple[int, int, int]]:
        """(sm, first tile, end tile) covering [0, tiles) with contiguous ranges of whole `unit`s, at most
        one range per SM."""
        out = self._unit_ranges(tiles // unit, cost * unit)
        return [(sm, a * unit, b * unit) for sm, a, b in out]

    def _unit_ranges(self, tiles: int, cost: int) -> list[tuple[int, int, int]]:
        counts = [0] * self.n
        if self.strategy == "balanced":
            # Every phase ends in a dependency everyone waits for, so spread each phase evenly; the
            # SMs with the least work so far take the remainder.
            base, extra = divmod(tiles, self.n)
            counts = [base] * self.n
            for s in sorted(range(self.n), key=lambda s: (self.load[s], s))[:extra]:
                counts[s] += 1
            for s in range(self.n):
                if counts[s]:
                    self.load[s] += counts[s] * cost + INSTR_OVERHEAD_BYTES
            order = list(range(self.n))
        elif self.strategy == "round_robin":
            for k in range(tiles):
                counts[(self.cursor + k) % self.n] += 1
            self.cursor = (self.cursor + tiles) % self.n
            order = list(range(self.n))
        else:
            cuts = sorted(self.rng.randint(0, tiles) for _ in range(self.n - 1))
            bounds = [0, *cuts, tiles]
            counts = [bounds[i + 1] - bounds[i] for i in range(self.n)]
            order = list(range(self.n))
            self.rng.shuffle(order)
        out, t = [], 0
        for s in order:
            if counts[s]:
                out.append((s, t, t + counts[s]))
                t += counts[s]
        return out


def build_program(d: Dims, num_sms: int, strategy: str = "round_robin", seed: int = 0) -> Program:
    """The whole decode step for `d` on `num_sms` SMs."""
    if num_sms < 1:
        raise ScheduleError(f"num_sms must be >= 1, got {num_sms}")
    if d.head_dim % TILE:
        raise ScheduleError(f"head_dim must be a multiple of {TILE} (RoPE pairs are kept inside 16-row tiles)")
    ctr = d.counters
    assign = _Assigner(strategy, num_sms, seed)
    placed: list[tuple[Instr, int]] = []

    def add(sm: int, instr: Instr) -> None:
        placed.append((instr, sm))

    attn_bytes = 2 * min(ATTN_CHUNK, d.page_size * d.max_pages) * d.head_dim * 2
    qkv_unit = d.head_tiles if d.qk_norm else 1
    for layer in range(d.layers):
        prev = (ctr.down_done(layer - 1), d.hidden_tiles) if layer else None
        for sm, t0, t1 in sorted(assign.ranges(d.qkv_tiles, TILE * d.hidden * 2, qkv_unit), key=lambda r: r[1]):
            add(sm, Instr(Op.QKV, layer, (t0, t1), prev, (ctr.qkv_done(layer), t1 - t0)))
        for b in range(d.batch):
            for kvh in range(d.kv_heads):
                for s in range(d.splits):
                    instr = Instr(
                        Op.ATTN,
                        layer,
                        (b, kvh, s, d.splits),
                        wait=(ctr.qkv_done(layer), d.qkv_tiles),
                        signal=(ctr.arrive(layer, b, kvh), 1),
                        arrive_target=d.splits,
                        done=ctr.attn_done(layer),
                    )
                    add(assign.item(attn_bytes), instr)
        waits = {
            Op.OPROJ: (ctr.attn_done(layer), d.batch * d.kv_heads),
            Op.GATEUP: (ctr.oproj_done(layer), d.hidden_tiles),
            Op.DOWN: (ctr.gateup_done(layer), d.inter_tiles),
        }
        signals = {Op.OPROJ: ctr.oproj_done(layer), Op.GATEUP: ctr.gateup_done(layer), Op.DOWN: ctr.down_done(layer)}
        for op, tiles, cost in _tile_phases(d):
            for sm, t0, t1 in sorted(assign.ranges(tiles, cost), key=lambda r: r[1]):
                add(sm, Instr(op, layer, (t0, t1), waits[op], (signals[op], t1 - t0)))
    lm_wait = (ctr.down_done(d.layers - 1), d.hidden_tiles)
    for sm, t0, t1 in sorted(assign.ranges(d.vocab_tiles, TILE * d.hidden * 2), key=lambda r: r[1]):
        add(sm, Instr(Op.LMHEAD, d.layers - 1, (t0, t1), lm_wait, None))

    instrs, queues = [], [[] for _ in range(num_sms)]
    for index, (instr, sm) in enumerate(placed):
        instr = Instr(**{**instr.__dict__, "index": index})
        instrs.append(instr)
        queues[sm].append(instr)
    return Program(d, num_sms, instrs, queues)


# ---------------------------------------------------------------------------------------------------
# Validation


def accesses(instr: Instr, d: Dims) -> list[tuple[str, int, int, str]]:
    """(buffer, lo, hi, kind) over flattened buffers; kind r(ead), w(rite) or x (commutative reduce).

    resid, act and logits are indexed feature-major (element i of sequence b at i * B + b), because
    their accesses cover every sequence at once; q, part and attn_out are indexed sequence-major.
    Weights, the embedding and KV of earlier positions are immutable during a step and not listed; the
    K/V rows of the current position are ('kvnew', [layer, K|V, kv head, sequence, dim]).
    """
    op, layer, a, nb = instr.op, instr.layer, instr.args, d.batch
    out: list[tuple[str, int, int, str]] = []

    def tiles(m: int) -> tuple[int, int]:
        return a[0] * TILE * nb, min(a[1] * TILE, m) * nb

    if op == Op.QKV:
        if layer:
            out.append(("resid", 0, d.hidden * nb, "r"))
        for t in range(a[0], a[1]):
            j, dims = d.qkv_tile(t)
            runs = [(dims[0], dims[7] + 1), (dims[8], dims[15] + 1)]
            for b in range(nb):
                if j < d.heads:
                    out += [
                        ("q", b * d.q_size + j * d.head_dim + x, b * d.q_size + j * d.head_dim + y, "w")
                        for x, y in runs
                    ]
                else:
                    kv = 0 if j < d.heads + d.kv_heads else 1
                    base = (((layer * 2 + kv) * d.kv_heads + d.kv_head_of(j)) * nb + b) * d.head_dim
                    out += [("kvnew", base + x, base + y, "w") for x, y in runs]
    elif op == Op.ATTN:
        b, kvh, s = a[0], a[1], a[2]
        lo = (b * d.heads + kvh * d.group) * d.head_dim
        out.append(("q", lo, lo + d.group * d.head_dim, "r"))
        for kv in (0, 1):
            k = (((layer * 2 + kv) * d.kv_heads + kvh) * nb + b) * d.head_dim
            out.append(("kvnew", k, k + d.head_dim, "r"))
        p = (b * d.kv_heads + kvh) * d.splits + s
        out.append(("part", p, p + 1, "w"))
    elif op == Op.OPROJ:
        out.append(("attn_out", 0, nb * d.q_size, "r"))
        if layer:
            out.append(("resid", *tiles(d.hidden), "r"))
        out.append(("resid", *tiles(d.hidden), "w"))
    elif op == Op.GATEUP:
        out.append(("resid", 0, d.hidden * nb, "r"))
        out.append(("act", *tiles(d.inter), "w"))
    elif op == Op.DOWN:
        out.append(("act", 0, d.inter * nb, "r"))
        out.append(("resid", *tiles(d.hidden), "r"))
        out.append(("resid", *tiles(d.hidden), "w"))
    elif op == Op.LMHEAD:
        out.append(("resid", 0, d.hidden * nb, "r"))
        out.append(("logits", *tiles(d.vocab), "w"))
        out.append(("argmax", 0, nb, "x"))
    return out


def merge_accesses(layer: int, b: int, kvh: int, d: Dims) -> list[tuple[str, int, int, str]]:
    """What the last split of (layer, b, kvh) does after arriving: merge every split's partial."""
    p = (b * d.kv_heads + kvh) * d.splits
    lo = (b * d.heads + kvh * d.group) * d.head_dim
    return [("part", p, p + d.splits, "r"), ("attn_out", lo, lo + d.group * d.head_dim, "w")]


@dataclass
class _Node:
    """A DAG node: a real instruction, or the merge done by whichever split of a group arrives last."""

    wait: tuple[int, int] | None
    signal: tuple[int, int] | None
    acc: list[tuple[str, int, int, str]]
    name: str


def _check_fields(p: Program) -> None:
    d, size = p.dims, p.dims.counters.size
    limits = {Op.ATTN: (d.batch, d.kv_heads, d.splits, d.splits + 1)}
    tiles = {
        Op.QKV: d.qkv_tiles,
        Op.OPROJ: d.hidden_tiles,
        Op.GATEUP: d.inter_tiles,
        Op.DOWN: d.hidden_tiles,
        Op.LMHEAD: d.vocab_tiles,
    }
    for i, instr in enumerate(p.instrs):
        if instr.index != i:
            raise ScheduleError(f"instruction {i} carries index {instr.index}")
        if instr.op == Op.NOOP or not 0 <= instr.layer < d.layers:
            raise ScheduleError(f"instruction {i}: bad opcode/layer {instr.op!r}/{instr.layer}")
        if instr.op in limits and any(not 0 <= x < m for x, m in zip(instr.args, limits[instr.op], strict=True)):
            raise ScheduleError(f"instruction {i}: argument out of range {instr}")
        if instr.op in tiles and not 0 <= instr.args[0] < instr.args[1] <= tiles[instr.op]:
            raise ScheduleError(f"instruction {i}: bad tile range {instr.args}")
        if instr.op == Op.QKV and d.qk_norm and (instr.args[0] % d.head_tiles or instr.args[1] % d.head_tiles):
            raise ScheduleError(f"instruction {i}: q/k norm needs QKV ranges of whole heads, got {instr.args}")
        for c in (instr.wait, instr.signal):
            if c is not None and not 0 <= c[0] < size:
                raise ScheduleError(f"instruction {i}: counter {c[0]} out of range")


def _check_coverage(p: Program) -> None:
    """Every head, attention split and tile of every layer is computed exactly once."""
    d = p.dims
    seen: dict[tuple, int] = defaultdict(int)
    for instr in p.instrs:
        if instr.op == Op.ATTN:
            seen[(instr.op, instr.layer, *instr.args)] += 1
        else:
            for t in range(instr.args[0], instr.args[1]):
                seen[(instr.op, instr.layer, t)] += 1
    want: list[tuple] = []
    for layer in range(d.layers):
        want += [(Op.QKV, layer, t) for t in range(d.qkv_tiles)]
        want += [
            (Op.ATTN, layer, b, k, s, d.splits)
            for b in range(d.batch)
            for k in range(d.kv_heads)
            for s in range(d.splits)
        ]
        want += [(op, layer, t) for op, tiles, _ in _tile_phases(d) for t in range(tiles)]
    want += [(Op.LMHEAD, d.layers - 1, t) for t in range(d.vocab_tiles)]
    if set(seen) != set(want) or any(n != 1 for n in seen.values()):
        missing = sorted(set(want) - set(seen), key=str)[:3]
        extra = sorted((k for k, n in seen.items() if n != 1 or k not in set(want)), key=str)[:3]
        raise ScheduleError(f"work not covered exactly once: missing {missing}, duplicated or unknown {extra}")


def _check_queues(p: Program) -> None:
    where: dict[int, int] = {}
    for sm, queue in enumerate(p.queues):
        last = -1
        for instr in queue:
            if instr.index in where:
                raise ScheduleError(f"instruction {instr.index} is queued on SMs {where[instr.index]} and {sm}")
            if instr.index <= last:
                raise ScheduleError(f"SM {sm}: queue does not follow the global order ({last} then {instr.index})")
            if p.instrs[instr.index] != instr:
                raise ScheduleError(f"SM {sm}: queued instruction {instr.index} differs from the global one")
            where[instr.index], last = sm, instr.index
    if len(where) != len(p.instrs):
        raise ScheduleError(f"{len(p.instrs) - len(where)} instructions are on no SM's queue")


def _nodes(p: Program) -> list[_Node]:
    """Instructions in global order, each group's merge node right after the group's last split."""
    d = p.dims
    groups: dict[int, list[Instr]] = defaultdict(list)
    for instr in p.instrs:
        if instr.op == Op.ATTN:
            groups[instr.signal[0]].append(instr)
    last = {}
    for members in groups.values():
        if len({i.arrive_target for i in members}) != 1:
            raise ScheduleError(f"#{members[0].index}: the splits of one group disagree on the arrival target")
        last[members[-1].index] = members[-1]
    nodes = []
    for instr in p.instrs:
        nodes.append(_Node(instr.wait, instr.signal, accesses(instr, d), f"#{instr.index} {instr.op.name}"))
        if instr.index in last:
            b, kvh = instr.args[0], instr.args[1]
            acc = merge_accesses(instr.layer, b, kvh, d)
            wait = (instr.signal[0], instr.arrive_target)
            nodes.append(_Node(wait, (instr.done, 1), acc, f"merge(l{instr.layer} b{b} kv{kvh})"))
    return nodes


def _check_counters(nodes: list[_Node]) -> dict[int, list[int]]:
    """Each counter's waiters wait for exactly the sum of its signals; returns signallers per counter."""
    total: dict[int, int] = defaultdict(int)
    signallers: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        if n.signal is not None:
            total[n.signal[0]] += n.signal[1]
            signallers[n.signal[0]].append(i)
    for n in nodes:
        if n.wait is not None and total.get(n.wait[0], 0) != n.wait[1]:
            raise ScheduleError(
                f"{n.name} waits for counter {n.wait[0]} to reach {n.wait[1]} but its signals add up to "
                f"{total.get(n.wait[0], 0)}"
            )
    return signallers


def _check_acyclic(nodes: list[_Node], signallers: dict[int, list[int]]) -> None:
    """Kahn's algorithm on the counter DAG, then: every producer precedes its consumers in the order."""
    preds = [signallers.get(n.wait[0], []) if n.wait else [] for n in nodes]
    succs: list[list[int]] = [[] for _ in nodes]
    indeg = [len(p) for p in preds]
    for i, ps in enumerate(preds):
        for s in ps:
            succs[s].append(i)
    ready = [i for i, k in enumerate(indeg) if k == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in succs[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    if done != len(nodes):
        stuck = next(nodes[i].name for i, k in enumerate(indeg) if k)
        raise ScheduleError(f"dependency cycle through {stuck}")
    for i, ps in enumerate(preds):
        late = [s for s in ps if s >= i]
        if late:
            raise ScheduleError(f"{nodes[i].name} waits on {nodes[late[0]].name}, which comes later in the order")


def _check_races(nodes: list[_Node], signallers: dict[int, list[int]]) -> None:
    """Every two accesses to one element, at least one a write, must be ordered by the counter DAG.

    Ancestors are bitsets (Python ints). Per buffer, disjoint segments remember the last writer and the
    readers and reducers since; a new access checks exactly the accesses it could conflict with.
    """
    anc: list[int] = []
    ctr_anc: dict[int, int] = {}
    buffers: dict[str, _Segments] = defaultdict(_Segments)
    for i, n in enumerate(nodes):
        mine = 0
        if n.wait is not None:
            c = n.wait[0]
            if c not in ctr_anc:
                ctr_anc[c] = 0
                for s in signallers[c]:
                    ctr_anc[c] |= anc[s] | (1 << s)
            mine = ctr_anc[c]
        anc.append(mine)
        mine |= 1 << i  # a node may read and then rewrite what it owns
        for buf, lo, hi, kind in n.acc:
            for seg in buffers[buf].cover(lo, hi):
                writer, readers, reducers = seg
                need = writer | (reducers if kind != "x" else 0) | (readers if kind != "r" else 0)
                if need & ~mine:
                    other = nodes[(need & ~mine).bit_length() - 1].name
                    raise ScheduleError(f"race on {buf}[{lo}:{hi}] between {other} and {n.name}")
                if kind == "w":
                    seg[:] = [1 << i, 0, 0]
                elif kind == "r":
                    seg[1] |= 1 << i
                else:
                    seg[2] |= 1 << i


class _Segments:
    """A buffer cut into disjoint segments [starts[k], starts[k+1]) with [writer, readers, reducers]."""

    def __init__(self):
        self.starts = [0]
        self.data = [[0, 0, 0]]

    def _split(self, x: int) -> None:
        k = bisect.bisect_right(self.starts, x) - 1
        if self.starts[k] != x:
            self.starts.insert(k + 1, x)
            self.data.insert(k + 1, list(self.data[k]))

    def cover(self, lo: int, hi: int) -> list[list[int]]:
        self._split(lo)
        self._split(hi)
        return self.data[bisect.bisect_left(self.starts, lo) : bisect.bisect_left(self.starts, hi)]


def validate(p: Program) -> None:
    """Reject any program that could deadlock, race, or leave work undone. Raises ScheduleError."""
    if len(p.queues) != p.num_sms:
        raise ScheduleError(f"{len(p.queues)} queues for {p.num_sms} SMs")
    _check_fields(p)
    _check_coverage(p)
    _check_queues(p)
    nodes = _nodes(p)
    signallers = _check_counters(nodes)
    _check_acyclic(nodes, signallers)
    _check_races(nodes, signallers)
