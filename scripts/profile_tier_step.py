"""Where a tiered decode step's time goes: `megatier bench tiers`' workload, one method at a time, with
the step's phases timed (the device synchronized around each, so a phase's time includes the GPU work it
queued) and then the same steps untimed under torch.profiler.

    python scripts/profile_tier_step.py --methods megatier-sparse megatier-dense --json OUT.json

Phases: the store's begin_step (host planning and table uploads), the CUDA-graph replay (the forward
pass), end_step (importance, statistics, migrations) and inside it plan_migrations, the in-place swaps
and the async moves. The clean run's step time is what the bench reports; the phases run slower by the
synchronizations they add.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict

import torch

import megatier.kv.tiered as tiered_mod
from megatier.bench.common import record, write_json
from megatier.bench.tiers import make_pools, run_method
from megatier.config import load_config
from megatier.executors.graph import GraphExecutor
from megatier.kv.locality import Importance
from megatier.kv.tiered import TieredKV
from megatier.kv.tiers import TieredPools
from megatier.loader import dummy_weights, resolve_model

CUDA = torch.cuda.is_available()
TIMES: dict[str, list[float]] = defaultdict(list)
ENABLED = [False]


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not ENABLED[0]:
            return fn(*args, **kwargs)
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if CUDA:
            torch.cuda.synchronize()
        TIMES[name].append(time.perf_counter() - t0)
        return out

    return wrapper


def patch() -> None:
    for owner, attr, name in [
        (TieredKV, "begin_step", "begin_step"),
        (TieredKV, "end_step", "end_step"),
        (Importance, "end_step", "end_step.importance"),
        (TieredPools, "swap", "end_step.swap"),
        (TieredPools, "move", "end_step.move"),
        (TieredPools, "poll", "begin_step.poll"),
        (torch.cuda.CUDAGraph, "replay", "graph_replay"),
        (GraphExecutor, "forward", "forward"),
    ]:
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    tiered_mod.plan_migrations = timed("end_step.plan_migrations", tiered_mod.plan_migrations)


def profile_run(cfg, weights, pools, method, bench, context, steps):
    """One run of `method` with `steps` timed steps under torch.profiler: (profiler, the run's result)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * CUDA
    with torch.profiler.profile(activities=activities) as prof:
        result = run_method(cfg, weights, pools, method, argparse.Namespace(**{**vars(bench), "steps": steps}), context)
    return prof, result


def per_step_kernels(few, many, extra_steps: int, top: int = 25) -> dict[str, float]:
    """Device time a step by kernel: two profiled runs that differ only in their step count, differenced,
    so the fill, the warm-up and the capture (the same in both) cancel."""

    def totals(prof) -> dict[str, float]:
        return {e.key: e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0}

    a, b = totals(few), totals(many)
    diff = {name: (b.get(name, 0.0) - a.get(name, 0.0)) / extra_steps for name in a.keys() | b.keys()}
    ranked = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
    return {name[:90]: round(us, 1) for name, us in ranked}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--hbm-fraction", type=float, default=0.125)
    ap.add_argument("--methods", nargs="+", default=["megatier-sparse"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json")
    ap.add_argument("--per-step-steps", type=int, default=8, help="extra steps of the second profiled run")
    ap.add_argument("--trace-dir", help="write each method's profiler table here")
    args = ap.parse_args()
    device = torch.device("cuda" if CUDA else "cpu")  # CPU: a smoke run of the script
    cfg = load_config(resolve_model(args.model))
    weights = dummy_weights(cfg, 0, torch.bfloat16, device)
    bench = argparse.Namespace(
        batch=args.batch, kv_sparse_budget=0.125, kv_sparse_residency_bonus=None, seed=0, steps=args.steps,
        repeats=1, warmup=None, drift_every=8, migration_mib=None, pcie_share=None,
    )  # fmt: skip
    patch()
    pools = make_pools(cfg, device, args.batch, args.context, args.hbm_fraction, 3 * args.steps + 200)
    out = {}
    for method in args.methods:
        clean = run_method(cfg, weights, pools, method, bench, args.context)
        TIMES.clear()
        ENABLED[0] = True
        phased = run_method(cfg, weights, pools, method, bench, args.context)
        ENABLED[0] = False
        steps = args.steps
        phases = {name: 1e3 * statistics.median(v[-steps:]) for name, v in sorted(TIMES.items())}
        few, many = 4, 4 + args.per_step_steps
        prof, profiled = profile_run(cfg, weights, pools, method, bench, args.context, few)
        prof_many, _ = profile_run(cfg, weights, pools, method, bench, args.context, many)
        per_step = per_step_kernels(prof, prof_many, many - few)
        table_cuda = prof.key_averages().table(sort_by="cuda_time_total" if CUDA else "cpu_time_total", row_limit=25)
        table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        if args.trace_dir:
            with open(f"{args.trace_dir}/profile_{method}.txt", "w") as f:
                f.write(f"# {method}: sorted by CUDA total\n{table_cuda}\n# sorted by self CPU\n{table_cpu}\n")
        print(f"{method}: clean {clean['step_ms']:.2f} ms/step, phases (ms, median of {steps} steps):")
        for name, ms in phases.items():
            print(f"  {name:28s} {ms:8.2f}")
        print(table_cuda)
        print(f"  device time a step by kernel (us; runs of {many} and {few} steps, differenced):")
        for name, us in per_step.items():
            print(f"  {us:9.1f}  {name}")
        out[method] = {
            "clean_step_ms": clean["step_ms"],
            "clean_tokens_per_s": clean["tokens_per_s"],
            "clean_hit_rate": clean.get("hbm_hit_rate"),
            "clean_migrated_mib_per_step": clean.get("migrated_bytes_per_step", 0) / 2**20,
            "phased_step_ms": phased["step_ms"],
            "phases_ms": phases,
            "profiled_step_ms": profiled["step_ms"],
            "kernel_us_per_step": per_step,
        }
    rec = record("tier_step_profile", device, vars(args), out)
    if args.json:
        write_json(args.json, rec)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
