"""Where a megakernel step's time goes, from a recorded timeline: phases per layer and the step boundary.

    python scripts/timeline_phases.py DIR/megakernel_timeline.pt [--json OUT]

The .pt file is what `scripts/gpu_megakernel.py` saves (stamps and encoded queues). Times are in µs from
the end of the previous layer's last DOWN instruction, taken as the median over the middle layers
(1 .. layers - 2): for each opcode when its instructions are ready (counter satisfied), how long they work
until their signal, their release add's fence, and when they end (median and max over SMs), also split
by the number of tiles an instruction holds. Then layer 0 from the step start, the LM head from the last
DOWN, and the step boundary (exit adds and the finalizing CTA).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from megatier.executors.megakernel.isa import Instr, Op

START, READY, END, LOADER, SIG, ADD = range(6)


def load(path: Path) -> tuple[list[list[Instr]], torch.Tensor]:
    data = torch.load(path)
    queues = [[Instr.decode(list(w)) for w in q] for q in data["queues"]]
    return queues, data["stamps"].long()


def size_of(instr: Instr) -> int:
    """Tiles of a tiled opcode, 1 for attention."""
    return instr.args[1] - instr.args[0] if instr.op != Op.ATTN else 1


def phases(queues: list[list[Instr]], stamps: torch.Tensor) -> dict:
    layers = 1 + max(i.layer for q in queues for i in q)
    by_layer: dict[tuple[int, bool], list[tuple[int, Instr, list[int]]]] = defaultdict(list)  # (layer, LM head)
    for sm, queue in enumerate(queues):
        for k, instr in enumerate(queue):
            st = [int(x) for x in stamps[sm, k]]
            if st[END]:
                by_layer[(instr.layer, instr.op == Op.LMHEAD)].append((sm, instr, st))
    down_end = {
        layer: max(st[END] for _, i, st in by_layer[(layer, False)] if i.op == Op.DOWN) for layer in range(layers)
    }
    per: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for layer in range(1, layers - 1):
        t0 = down_end[layer - 1]
        rows: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for _, instr, st in by_layer[(layer, False)]:
            for key in ((instr.op.name, 0), (instr.op.name, size_of(instr))):
                rows[key]["ready"].append((st[READY] - t0) / 1e3)
                rows[key]["end"].append((st[END] - t0) / 1e3)
                if st[ADD]:
                    rows[key]["fence"].append((st[END] - st[ADD]) / 1e3)
                if st[SIG]:
                    rows[key]["work"].append((st[SIG] - st[READY]) / 1e3)
        for key, vals in rows.items():
            for name, xs in vals.items():
                per[key][name + "_med"].append(statistics.median(xs))
                per[key][name + "_max"].append(max(xs))
            per[key]["count"].append(len(vals["end"]))
    table = {
        f"{op}{'' if n == 0 else f' x{n}'}": {k: round(statistics.median(v), 2) for k, v in vals.items()}
        for (op, n), vals in sorted(per.items(), key=lambda kv: (Op[kv[0][0]], kv[0][1]))
    }
    layer_us = statistics.median((down_end[i] - down_end[i - 1]) / 1e3 for i in range(1, layers))
    head = by_layer[(layers - 1, True)]
    t_last = down_end[layers - 1]
    maxlen = stamps.shape[1] - 1
    bound = stamps[:, maxlen].tolist()
    step_start = [b[0] for b in bound if b[0]]
    exit_issued = [b[1] for b in bound if b[1]]
    finalize = [b for b in bound if b[3]]
    out = {
        "layer_us_median": round(layer_us, 2),
        "phases_from_previous_down_us": table,
        "layer0_from_step_start_us": round((down_end[0] - min(step_start)) / 1e3, 2) if step_start else None,
        "lmhead": {
            "ready_med_us": round(statistics.median((st[READY] - t_last) / 1e3 for _, _, st in head), 2),
            "end_med_us": round(statistics.median((st[END] - t_last) / 1e3 for _, _, st in head), 2),
            "end_max_us": round(max((st[END] - t_last) / 1e3 for _, _, st in head), 2),
        },
    }
    if exit_issued and finalize:
        last_head = max(st[END] for _, _, st in head)
        f = max(finalize, key=lambda b: b[3])  # the step recorded last; a row may hold an older finalize
        out["step_boundary_us"] = {
            "last_exit_add_after_last_lmhead": round((max(exit_issued) - last_head) / 1e3, 2),
            "finalize_start_after_last_lmhead": round((f[3] - last_head) / 1e3, 2),
            "finalize_takes": round((f[4] - f[3]) / 1e3, 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("timeline", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = phases(*load(args.timeline))
    print(f"layer {out['layer_us_median']} us (median); from the previous layer's last DOWN, medians over layers:")
    print(f"{'op':12s} {'n':>4s} {'ready':>6s} {'r.max':>6s} {'work':>6s} {'fence':>6s} {'end':>6s} {'e.max':>6s}")
    for name, v in out["phases_from_previous_down_us"].items():
        cells = [
            v.get(k, float("nan")) for k in ("ready_med", "ready_max", "work_med", "fence_med", "end_med", "end_max")
        ]
        print(f"{name:12s} {v['count']:4.0f} " + " ".join(f"{c:6.2f}" for c in cells))
    print("lm head", out["lmhead"], "layer 0 ends", out["layer0_from_step_start_us"], "us after the step start")
    print("step boundary", out.get("step_boundary_us"))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
