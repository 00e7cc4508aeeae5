"""Warp-stall samples per source line from an Nsight Compute report (SourceCounters section).

    python3 scripts/ncu_stalls.py REPORT.ncu-rep [--top 40] [--json OUT.json]

Uses ncu's Python report interface (ncu_report, shipped in the Nsight Compute install's extras/python):
sums the PC-sampling metrics smsp__pcsamp_warps_issue_stalled_* by reason over the whole kernel, then by
source file:line (the kernel is built with line info), and prints the lines with the most samples of
each of the largest reasons. Samples say where warps wait, in proportion to how long.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from collections import defaultdict

PREFIX = "smsp__pcsamp_warps_issue_stalled_"


def import_ncu_report():
    ncu = shutil.which("ncu")
    roots = [os.path.dirname(os.path.realpath(ncu))] if ncu else []
    roots += glob.glob("/opt/nvidia/nsight-compute/*") + glob.glob("/usr/local/cuda*/nsight-compute*")
    for root in roots:
        for path in glob.glob(os.path.join(root, "extras", "python")):
            sys.path.insert(0, path)
    import ncu_report

    return ncu_report


def per_pc(action, name: str) -> dict[int, int]:
    metric = action.metric_by_name(name)
    if metric is None or not metric.has_correlation_ids():
        return {}
    pcs = metric.correlation_ids()
    return {pcs.as_uint64(i): metric.as_uint64(i) for i in range(metric.num_instances())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("report")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    ncu_report = import_ncu_report()
    action = ncu_report.load_report(args.report).range_by_idx(0).action_by_idx(0)
    reasons = sorted(n for n in action.metric_names() if n.startswith(PREFIX) and not n.endswith("_not_issued"))
    samples = {r.removeprefix(PREFIX): per_pc(action, r) for r in reasons}
    totals = {r: sum(v.values()) for r, v in samples.items()}
    grand = sum(totals.values()) or 1
    print(f"{action.name()}: {grand} stall samples")
    for r, n in sorted(totals.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"  {r:28s} {n:9d}  {100 * n / grand:5.1f}%")

    def where(pc: int) -> str:
        info = action.source_info(pc)
        return f"{os.path.basename(info.file_name())}:{info.line()}" if info else f"pc {pc:#x}"

    by_line: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    sass: dict[str, str] = {}
    for r, v in samples.items():
        for pc, n in v.items():
            line = where(pc)
            by_line[line][r] += n
            sass.setdefault(line, action.sass_by_pc(pc))
    for r, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:6]:
        print(f"\n== {r}: lines with the most samples")
        rows = sorted(by_line.items(), key=lambda kv: -kv[1].get(r, 0))[: args.top]
        for line, counts in rows:
            if counts.get(r):
                print(f"  {counts[r]:8d}  {line:26s} {sass[line][:70]}")
    if args.json:
        out = {"totals": totals, "by_line": {k: dict(v) for k, v in by_line.items()}, "sass": sass}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
