"""Megakernel timings on the GPU machine: one process, results as JSON (+ a timeline Gantt PNG).

    python scripts/gpu_megakernel.py --out DIR [--quick]

Measures, on dummy Llama-3.2-1B weights (bf16): device copy bandwidth (the floor's denominator); batch-1
and batch-8 per-step time of decode_greedy (CUDA graphs of 16 steps, everything on the device); batch 1
at 16K context; free-running greedy agreement with the bf16 and fp32 reference over 128 steps; one step's
per-instruction timeline. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timeline_phases import load as load_timeline
from timeline_phases import phases

from megakernel_helpers import dummy_weights, garbage_kv, llama_1b_config, page_tables, random_prompts
from megatier.bench.common import git_commit
from megatier.executors.base import StepBatch
from megatier.executors.megakernel.runner import MegakernelExecutor
from megatier.executors.megakernel.timeline import render_gantt, summarize
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache

CUDA = torch.device("cuda")
PAGE = 16
WEIGHT_BYTES = 2_471_628_800


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 10)."""
    x = torch.empty(1 << 30, dtype=torch.int16, device=CUDA).random_()
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * x.numel() * 2 / sorted(times[2:])[len(times[2:]) // 2]


def time_decode(ex: MegakernelExecutor, batch: StepBatch, steps: int, reps: int, **options) -> dict:
    """Median per-step time of decode_greedy(batch, steps, **options), warm (compiled, graph captured)."""
    ex.decode_greedy(batch, steps, **options)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        tokens = ex.decode_greedy(batch, steps, **options)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / steps)
    times.sort()
    return {"us_per_step": times[len(times) // 2], "min_us": times[0], "max_us": times[-1], "tokens": tokens}


def prefilled_batch(cfg, weights, lengths: list[int], tables: list[list[int]], cache: KVCache, seed: int) -> StepBatch:
    """Prompts written into the cache by the reference; the decode batch that follows them."""
    prompts = random_prompts(lengths, cfg.vocab_size, seed=seed)
    ReferenceExecutor(cfg, weights, cache=cache).forward(
        StepBatch([t for p in prompts for t in p[:-1]], [0] * len(prompts), [len(p) - 1 for p in prompts], tables)
    )
    return StepBatch([p[-1] for p in prompts], [len(p) - 1 for p in prompts], [1] * len(prompts), tables)


def greedy_reference(cfg, weights, cache: KVCache, batch: StepBatch, steps: int) -> torch.Tensor:
    ref = ReferenceExecutor(cfg, weights, cache=cache)
    ids, starts, out = list(batch.token_ids), list(batch.starts), []
    for _ in range(steps):
        ids = ref.forward(StepBatch(ids, starts, [1] * len(ids), batch.page_tables)).argmax(-1).tolist()
        starts = [s + 1 for s in starts]
        out.append(ids)
    return torch.tensor(out)


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a.cpu() != b.cpu()).any(-1).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 16K context")
    parser.add_argument(
        "--variants", default="", help="comma list of more carried kernel packages to time, each PKG[@ENV=VALUE...]"
    )
    parser.add_argument("--lean", action="store_true", help="only this kernel, the variants and the timeline")
    parser.add_argument("--timeline-of", default="", help="take the timeline with this variant (PKG[@ENV=VALUE...])")
    parser.add_argument("--timeline-batches", default="1", help="comma list of batch sizes (1 and/or 8) to record")
    args = parser.parse_args()
    timeline_batches = [int(n) for n in filter(None, args.timeline_batches.split(","))]
    if not set(timeline_batches) <= {1, 8}:
        parser.error(f"--timeline-batches: only 1 and 8 are recorded, got {args.timeline_batches!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(CUDA)
    res: dict = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import cuda.core

        res["cuda_core"] = cuda.core.__version__
    except Exception as e:
        res["cuda_core"] = repr(e)
    reps = 3 if args.quick else 7

    def stage(name, fn):
        t = time.time()
        try:
            res[name] = fn()
        except Exception:
            res[name] = {"error": traceback.format_exc()[-3000:]}
        print(f"[{time.time() - t:6.1f}s] {name}: {str(res[name])[:400]}", flush=True)
        (args.out / "megakernel_results.json").write_text(json.dumps(res, indent=1, default=str))

    stage("copy_bw_GBps", lambda: copy_bandwidth() / 1e9)
    cfg = llama_1b_config()
    weights = dummy_weights(cfg, 0, torch.bfloat16, CUDA)
    cache = KVCache.allocate(cfg, 1100, PAGE, torch.bfloat16, CUDA)
    garbage_kv(cache)
    ex = MegakernelExecutor(cfg, weights, cache=cache)

    lengths8 = [32, 5, 200, 77, 1, 128, 64, 9]
    tables = page_tables([n + 128 for n in [32, *lengths8]], PAGE, cache.num_pages)  # disjoint pages
    b1 = prefilled_batch(cfg, weights, [32], tables[:1], cache, seed=1)
    b8 = prefilled_batch(cfg, weights, lengths8, tables[1:], cache, seed=8)
    saved = cache.kv.clone()
    floor = WEIGHT_BYTES / (res["copy_bw_GBps"] * 1e9) * 1e6

    def agreement():
        mk = ex.decode_greedy(b1, 128).cpu()
        out = {"tokens": mk[:, 0].tolist(), "distinct_tokens": len(set(mk[:, 0].tolist()))}
        for name, dtype in (("bf16_reference", torch.bfloat16), ("fp32_reference", torch.float32)):
            c = KVCache(saved.to(dtype, copy=True))
            ref = greedy_reference(cfg, weights.to(CUDA, dtype), c, b1, 128)
            out[name] = {"first_divergence": first_divergence(mk, ref), "equal_tokens": int((mk == ref).sum())}
        return out

    stage("greedy_agreement_128", agreement)

    main_tokens: dict[int, torch.Tensor] = {}  # this kernel's 128 greedy tokens per batch size

    def strategies(batch):
        out = {}
        for strategy in ("round_robin",) if args.lean else ("balanced", "round_robin"):
            ex.set_schedule(strategy)
            r = time_decode(ex, batch, 128, reps)
            main_tokens[len(batch.token_ids)] = r.pop("tokens").cpu()
            out[strategy] = r
        return out

    stage("batch1_ctx32", lambda: strategies(b1))
    best_strategy = min(res["batch1_ctx32"].items(), key=lambda kv: kv[1]["us_per_step"])[0]
    res["batch1_best"] = {
        **res["batch1_ctx32"][best_strategy],
        "strategy": best_strategy,
        "floor_us_at_copy_bw": floor,
        "graph_error": ex.graph_error,
    }
    stage("batch8_mixed", lambda: strategies(b8))
    ex.set_schedule(best_strategy)

    def timed_and_freed(make) -> dict:
        """Batch-1 and batch-8 timings of another executor (built by `make`, the only reference to it),
        whose memory is given back afterwards."""
        executor = make()
        out = {}
        for name, batch in (("batch1_ctx32", b1), ("batch8_mixed", b8)):
            r = time_decode(executor, batch, 128, reps)
            tokens, mine = r.pop("tokens").cpu(), main_tokens.get(len(batch.token_ids))
            out[name] = {**r, "tokens_equal_this_kernel": None if mine is None else bool(torch.equal(tokens, mine))}
        del executor
        torch.cuda.empty_cache()
        return out

    def carried_executor(spec: str, **options):
        """The executor class of a carried kernel package, and the build environment its spec names:
        PKG[@ENV=VALUE...], the package carried as .PKG/PKG/ with its imports renamed (e.g.
        `cp -r src/megatier/executors/megakernel .mk_prev/mk_prev` plus a sed of the imports)."""
        package, *env = spec.split("@")
        root = Path(__file__).resolve().parents[1] / f".{package}"
        if not root.is_dir():
            return None
        sys.path.insert(0, str(root))
        os.environ.update(dict(e.split("=", 1) for e in env))  # read by the package's build at compile time
        runner = __import__(f"{package}.runner", fromlist=["MegakernelExecutor"])
        return lambda **more: runner.MegakernelExecutor(cfg, weights, cache=cache, **options, **more)

    def earlier_kernel(spec: str, **options):
        def run():
            make = carried_executor(spec, **options)
            return None if make is None else timed_and_freed(make)

        return run

    if not args.lean:
        stage("previous_kernel", earlier_kernel("mk_prev", strategy="round_robin"))
    for spec in filter(None, args.variants.split(",")):
        stage(f"variant_{spec}", earlier_kernel(spec, strategy="round_robin"))

    def graph_executor():
        from megatier.executors.graph import GraphExecutor

        return timed_and_freed(lambda: GraphExecutor(cfg, weights, cache=cache))

    if not args.lean:
        stage("graph_executor", graph_executor)

    def steps_per_launch():
        """Per-step time against how many steps one launch runs (the kernel loops over steps)."""
        return {k: time_decode(ex, b1, 128, reps, check_every=k)["us_per_step"] for k in (1, 4, 16, 64)}

    if not args.lean:
        stage("batch1_steps_per_launch", steps_per_launch)

    def long_context(ctx):
        def run():
            tables = page_tables([ctx + 32], PAGE, cache.num_pages, seed=5)
            batch = StepBatch([11], [ctx], [1], tables)  # KV below ctx: random (no prefill needed for timing)
            return {k: v for k, v in time_decode(ex, batch, 32, reps).items() if k != "tokens"}

        return run

    if not args.quick:
        stage("batch1_ctx4k_32steps", long_context(4096))
        stage("batch1_ctx16k_32steps", long_context(16384))

    def timeline(batch: StepBatch):
        def run():
            cache.kv.copy_(saved)
            make = carried_executor(args.timeline_of, strategy=best_strategy) if args.timeline_of else None
            ext = (
                make(timeline=True)
                if make
                else MegakernelExecutor(cfg, weights, cache=cache, timeline=True, strategy=best_strategy)
            )
            n = len(batch.token_ids)
            ext.decode_greedy(batch, 4)
            program, stamps = ext.timeline_data(n)
            title = f"Llama-3.2-1B batch {n}, {props.name}, {best_strategy} schedule"
            suffix = "" if n == 1 else f"_b{n}"
            render_gantt(program, stamps, args.out / f"megakernel_timeline{suffix}.png", title)
            pt = args.out / f"megakernel_timeline{suffix}.pt"
            torch.save({"stamps": stamps, "queues": [[i.encode() for i in q] for q in program.queues]}, pt)
            return {**summarize(program, stamps), "phases": phases(*load_timeline(pt))}

        return run

    for n in timeline_batches:
        stage(f"timeline_batch{n}", timeline({1: b1, 8: b8}[n]))

    print("\n=== megakernel summary ===")
    print(f"copy bandwidth {res['copy_bw_GBps']:.0f} GB/s, weight floor {floor:.1f} us/step")
    variants = [f"variant_{p}" for p in filter(None, args.variants.split(","))]
    for key in ("batch1_ctx32", "batch8_mixed", "previous_kernel", *variants, "graph_executor"):
        for name, v in (res.get(key) or {}).items():
            if isinstance(v, dict) and "us_per_step" in v:
                print(
                    f"{key:26s} {name:12s} {v['us_per_step']:8.1f} us/step (min {v['min_us']:.1f} max {v['max_us']:.1f})"
                )
    for key in (
        "batch1_steps_per_launch",
        "batch1_ctx4k_32steps",
        "batch1_ctx16k_32steps",
        "timeline_batch1",
        "timeline_batch8",
    ):
        print(f"{key:26s} {str(res.get(key))[:300]}")
    agree = dict(res.get("greedy_agreement_128") or {})
    agree.pop("tokens", None)
    print(json.dumps(agree, default=str))


if __name__ == "__main__":
    main()
