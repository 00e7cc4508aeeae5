"""Turn the kernel's per-instruction globaltimer stamps into a summary and a Gantt chart.

Stamps are [num_sms, max_len, STAMPS] ns: consumer start, dependency satisfied, end, the loader's first
weight request for that instruction, the start of its signal (outputs stored, before the barrier) and
of its release add (after the barrier; end - this = the GPU-scope fence). Waiting (start -> satisfied)
is drawn light; work in the opcode's colour. Gaps between bars are bubbles: an SM with nothing to do.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from megatier.executors.megakernel.isa import Op
from megatier.executors.megakernel.schedule import Program

COLORS = {
    Op.QKV: "tab:blue",
    Op.ATTN: "tab:red",
    Op.OPROJ: "tab:orange",
    Op.GATEUP: "tab:green",
    Op.DOWN: "tab:purple",
    Op.LMHEAD: "tab:brown",
}


def spans(program: Program, stamps: torch.Tensor) -> list[tuple[int, Op, float, float, float]]:
    """(sm, op, start, satisfied, end) in microseconds from the earliest start."""
    raw = []
    for sm, queue in enumerate(program.queues):
        for i, instr in enumerate(queue):
            start, ready, end = (int(x) for x in stamps[sm, i, :3])
            if end:
                raw.append((sm, instr.op, start, ready, end))
    t0 = min(r[2] for r in raw)
    return [(sm, op, (s - t0) / 1e3, (r - t0) / 1e3, (e - t0) / 1e3) for sm, op, s, r, e in raw]


def summarize(program: Program, stamps: torch.Tensor) -> dict:
    """Makespan, and per opcode the SM-microseconds spent waiting for dependencies and working."""
    rows = spans(program, stamps)
    makespan = max(r[4] for r in rows)
    wait: dict[str, float] = defaultdict(float)
    work: dict[str, float] = defaultdict(float)
    busy: dict[int, float] = defaultdict(float)
    for sm, op, s, r, e in rows:
        wait[op.name] += r - s
        work[op.name] += e - r
        busy[sm] += e - s
    idle = sum(makespan - busy[sm] for sm in range(program.num_sms)) / program.num_sms
    return {
        "makespan_us": makespan,
        "mean_idle_us_per_sm": idle,
        "wait_sm_us": dict(wait),
        "work_sm_us": dict(work),
    }


def render_gantt(program: Program, stamps: torch.Tensor, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = spans(program, stamps)
    fig, ax = plt.subplots(figsize=(16, max(4, program.num_sms / 10)))
    for sm, op, s, r, e in rows:
        ax.barh(sm, r - s, left=s, height=0.8, color=COLORS[op], alpha=0.25, linewidth=0)
        ax.barh(sm, e - r, left=r, height=0.8, color=COLORS[op], linewidth=0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, [op.name for op in COLORS], loc="upper right", ncol=6)
    ax.set_xlabel("microseconds (light: waiting for a counter)")
    ax.set_ylabel("SM")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
