"""The graph executor on a GPU in one run: its tests on CUDA, a sweep of the fused GEMV kernels'
configurations, then greedy decode timing on the Llama-3.2-1B shape (dummy bf16 weights) through both
decode paths (fused GEMV kernels and cuBLAS) against the copy bandwidth measured in the same process.

    PYTHONPATH=src python scripts/gpu_graph_check.py [--skip-tests] [--steps 128] [--sweep-s 90]

Each timing is decode_greedy(num_steps) from a fixed context, timed with CUDA events over the whole
call and divided by the steps (so per-call glue is included), median of several calls after a warm-up
call that captures the graph. The GEMV arm runs every batch through the fused kernels (even 64 rows, to
find where cuBLAS should take over); programmatic dependent launch is also turned off once. Kernel
profiles of the headline case show where a step's time goes in each path. Logs and JSON go to $OUT when
set (the device tool's output folder), else to /tmp; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch
from gemv_sweep import sweep
from gpu_decode_diag import diagnose, variant_settings

from megatier.bench.common import copy_bandwidth, device_name, git_commit
from megatier.config import config_from_hf
from megatier.executors.base import StepBatch
from megatier.executors.graph import GraphExecutor
from megatier.kernels import gemv, pdl
from megatier.kv.pages import KVCache, pages_for
from megatier.loader import dummy_weights

OUT = Path(os.environ.get("OUT") or "/tmp/gpu_graph_check")
CASES = [(1, 32), (1, 4096), (8, 512), (64, 512)]  # (batch, prompt tokens): context grows by the steps
ARMS = {"gemv": 256, "cublas": 0}  # decode path -> GraphExecutor.gemv_max_batch


def run_tests(timeout_s: int, pdl_env: str) -> tuple[int, str]:
    """The graph executor's and its kernels' tests (all of them run on CUDA here); (rc, summary)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    cmd += ["tests/test_graph_executor.py", "tests/test_gemv.py", "-rfE", "--durations=5", "-s"]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", "4"]
    except ImportError:
        pass
    t0 = time.perf_counter()
    env = {**os.environ, "MEGATIER_PDL": pdl_env}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = (e.stdout or b"").decode() + f"\nTIMEOUT after {timeout_s}s", -1
    (OUT / f"pytest_pdl{pdl_env}.log").write_text(log)
    lines = [line for line in log.splitlines() if "PytestBenchmarkWarning" not in line and "warner(" not in line]
    print("\n".join(lines[-30:]), flush=True)
    failed = [line[:150] for line in lines if line.startswith(("FAILED", "ERROR"))]
    tail = lines[-1] if lines else "no output"
    return rc, f"PDL={pdl_env} rc={rc} in {time.perf_counter() - t0:.0f}s: {tail}" + "".join(
        f"\n    {f}" for f in failed[:8]
    )


def time_greedy(cfg, weights, batch_size: int, prompt_len: int, steps: int, gemv_max_batch: int, repeats: int = 5):
    device = torch.device("cuda")
    page_size = 16
    per_seq = pages_for(prompt_len + steps + 1, page_size)
    cache = KVCache.allocate(cfg, batch_size * per_seq, page_size, torch.bfloat16, device)
    ex = GraphExecutor(cfg, weights, cache=cache)
    ex.gemv_max_batch = gemv_max_batch
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch_size)]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len), generator=gen).tolist()
    prefill = StepBatch([t for p in prompts for t in p], [0] * batch_size, [prompt_len] * batch_size, tables)
    ex.forward(prefill)  # compiles; the timed pass rewrites the same KV
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = ex.forward(prefill)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    batch = StepBatch(logits.argmax(-1).tolist(), [prompt_len] * batch_size, [1] * batch_size, tables)
    ex.decode_greedy(batch, steps)  # warm-up: compiles and captures
    per_step = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ex.decode_greedy(batch, steps)
        end.record()
        end.synchronize()
        per_step.append(start.elapsed_time(end) * 1e3 / steps)
    kv_bytes = batch_size * (prompt_len + steps / 2) * cfg.kv_bytes_per_token(torch.bfloat16)
    return {
        "prefill_tok_per_s": batch_size * prompt_len / prefill_s,
        "us_per_step": statistics.median(per_step),
        "us_min": min(per_step),
        "us_max": max(per_step),
        "kv_bytes_per_step": kv_bytes,
        "splits": ex._num_splits(len(batch.starts), prompt_len + steps),
        "executor": ex,
        "batch": batch,
    }


def kernel_profile(ex: GraphExecutor, batch: StepBatch, steps: int) -> list[tuple[str, float, int]]:
    """(kernel name, device µs per step, launches per step) for the kernels of `steps` greedy steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ex.decode_greedy(batch, steps)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        total = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if total > 0:
            rows.append((evt.key[:70], total / steps, round(evt.count / steps)))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--test-timeout", type=int, default=240)
    parser.add_argument("--retry-without-pdl", action="store_true", help="rerun failing tests with PDL off")
    parser.add_argument("--sweep-s", type=float, default=90.0, help="seconds for trying GEMV configurations")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    import triton

    print(f"{device_name(device)}, torch {torch.__version__}, triton {triton.__version__}, commit {git_commit()}")
    cfg = config_from_hf(json.loads((files("megatier") / "configs/llama-3.2-1b.json").read_text()))
    weights = dummy_weights(cfg, 0, torch.bfloat16, device)
    print("decode correctness at the Llama-3.2-1B shape (rel. error vs fp32):", flush=True)
    diagnosis, fused_variant = diagnose(cfg, weights)
    # Time the first fused variant that is correct (graphs are needed for timing: eager counts as plain).
    timed_variant = "fused" if fused_variant in (None, "fused eager") else fused_variant
    print(f"correct fused variant: {fused_variant}; timing: {timed_variant}", flush=True)
    torch.cuda.empty_cache()

    tests = "skipped"
    if not args.skip_tests:
        rc, tests = run_tests(args.test_timeout, "1")
        if rc != 0 and args.retry_without_pdl:  # is programmatic dependent launch to blame?
            tests += "\n  " + run_tests(args.test_timeout, "0")[1]

    weight_bytes = weights.numel() * 2  # bf16
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; GEMV sweep (budget {args.sweep_s:.0f} s):", flush=True)
    try:
        with variant_settings(timed_variant):
            sweep_ex = GraphExecutor(cfg, weights, cache=KVCache.allocate(cfg, 64, 16, torch.bfloat16, device))
            sweep_rows = sweep(sweep_ex, (1, 8), args.sweep_s)
        del sweep_ex
    except Exception as e:  # report and go on with the defaults
        print(f"sweep FAILED {type(e).__name__}: {e}", flush=True)
        sweep_rows = [{"error": f"{type(e).__name__}: {e}"}]
    torch.cuda.empty_cache()

    results, profiles = [], {}
    runs = [(b, p, arm, True) for b, p in CASES for arm in ARMS] + [(1, 32, "gemv", False)]
    for batch_size, prompt_len, arm, use_pdl in runs:
        variant = timed_variant if arm == "gemv" else "cublas"
        label = f"B={batch_size} ctx={prompt_len}+{args.steps} {arm}" + ("" if use_pdl else " pdl=off")
        if arm == "gemv" and timed_variant != "fused":
            label += f" [{timed_variant}]"
        if arm == "gemv" and fused_variant is None:
            label += " INCORRECT"
        try:
            with variant_settings(variant):
                pdl.enabled = pdl.enabled and use_pdl
                r = time_greedy(cfg, weights, batch_size, prompt_len, args.steps, ARMS[arm])
        except Exception as e:  # report and go on: one broken case must not hide the others
            print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
            results.append({"case": label, "error": f"{type(e).__name__}: {e}"})
            continue
        if batch_size == 1 and prompt_len == 32 and use_pdl:
            try:
                profiles[arm] = kernel_profile(r["executor"], r["batch"], 16)
            except Exception as e:
                print(f"profile failed: {type(e).__name__}: {e}")
        step_s = r["us_per_step"] / 1e6
        moved = weight_bytes + r["kv_bytes_per_step"]
        results.append(
            {
                "case": label,
                "batch": batch_size,
                "prompt": prompt_len,
                "arm": arm,
                "pdl": use_pdl,
                "us_per_step": r["us_per_step"],
                "us_min": r["us_min"],
                "us_max": r["us_max"],
                "splits": r["splits"],
                "floor_us": moved / bandwidth * 1e6,
                "pct_of_copy_bw": 100 * moved / step_s / bandwidth,
                "tokens_per_s": batch_size / step_s,
                "prefill_tok_per_s": r["prefill_tok_per_s"],
            }
        )
        print(f"{label}: {r['us_per_step']:.1f} us/step", flush=True)
        del r
        torch.cuda.empty_cache()
    pdl.enabled = True
    record = {
        "device": device_name(device),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "PYTHONPATH=src python scripts/gpu_graph_check.py " + " ".join(sys.argv[1:]),
        "copy_GBps": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "results": results,
        "gemv_sweep": sweep_rows,
        "gemv_tuned": {"|".join(map(str, k)): list(v) for k, v in gemv.tuned.items()},
        "profile_us_per_step": {arm: rows[:30] for arm, rows in profiles.items()},
        "tests": tests,
        "diagnosis": diagnosis,
        "fused_variant_correct": fused_variant,
    }
    (OUT / "gpu_graph_check.json").write_text(json.dumps(record, indent=2) + "\n")

    for arm, rows in profiles.items():
        kernel_total = sum(r[1] for r in rows)
        launches = sum(r[2] for r in rows)
        print(f"\n{arm}: kernel time per step (B=1 ctx=32, profiled): {kernel_total:.0f} us in ~{launches} launches")
        for name, us, count in rows[:12]:
            print(f"  {us:8.1f} us  x{count:<4d} {name}")
    print(f"\ndevice: {device_name(device)}   copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write, 1 GiB copy)")
    print(f"weights {weight_bytes / 1e9:.3f} GB; floor = (weights + KV read) / copy bandwidth")
    print(f"tests: {tests}")
    by_case = {(r["batch"], r["prompt"], r["arm"], r["pdl"]): r for r in results if "error" not in r}
    print(
        f"{'case':36s} {'us/step':>9s} {'min':>8s} {'max':>8s} {'floor':>7s} {'%copyBW':>8s} {'tok/s':>8s} {'vs cuBLAS':>9s}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['case']:36s} ERROR {r['error'][:80]}")
            continue
        base = by_case.get((r["batch"], r["prompt"], "cublas", True))
        speedup = f"{base['us_per_step'] / r['us_per_step']:8.2f}x" if base else ""
        print(
            f"{r['case']:36s} {r['us_per_step']:9.1f} {r['us_min']:8.1f} {r['us_max']:8.1f} {r['floor_us']:7.0f} "
            f"{r['pct_of_copy_bw']:7.1f}% {r['tokens_per_s']:8.0f} {speedup:>9s}"
        )


if __name__ == "__main__":
    main()
