"""`megatier bench tiers`: decode throughput with a KV cache larger than the HBM budget, against baselines.

Every method runs the graph executor (its decode step captured in a CUDA graph wherever the step allows)
on the same model (dummy weights of a real shape) over the same synthetic KV, in one process:
- gpu-only: the plain KV cache, all in HBM (the ceiling; only when it fits);
- offload-fetch: KV beyond the HBM budget lives in pinned DRAM and every DRAM slice is gathered to the
  GPU each step, layer by layer (the vLLM / DeepSpeed offloading analogue);
- static-dense: attention where each slice lives, the host reading every DRAM slice, placement fixed;
- megatier-dense: as static-dense plus the balanced PCIe share of DRAM slices and online placement;
- sparse-offload-fetch: the same page selection as megatier sparse, placement fixed, the selected DRAM
  slices gathered to the GPU before attention (the fair sparse baseline);
- static-sparse: the same selection, placement fixed, selected DRAM slices read in place over PCIe;
- megatier-sparse: selection plus importance-driven online migration (misses read in place over PCIe);
  megatier-sparse-cpu has the host read them instead (one host round trip per layer, no graph).

The synthetic KV has a stated locality model: for each (sequence, layer) a set of pages as large as the
sparse budget (less sinks and recent window) carries keys 4x larger than the rest, so they win the
selection for any query. The sets differ by layer, start at random positions unknown to the initial
placement (which fills HBM in position order), and drift: every `drift_every` steps a quarter of each set
is swapped for other pages. The real-model check of locality and accuracy is scripts/passkey_tiers.py.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from megatier.bench.common import copy_bandwidth, read_bandwidth, record, write_json
from megatier.config import load_config
from megatier.executors.base import StepBatch
from megatier.executors.graph import GraphExecutor
from megatier.kernels.copy_slices import copy_slices
from megatier.kv.host_memory import huge_page_fraction
from megatier.kv.locality import forced_columns, recent_pages_for
from megatier.kv.pages import KVCache
from megatier.kv.tiered import TieredKV, TierStats
from megatier.kv.tiers import DRAM, HBM, TieredPools
from megatier.loader import dummy_weights, resolve_model

PAGE_SIZE = 16
HOT_SCALE = 4.0  # a power of two: scaling keys by it (and their min/max metadata) is exact in bf16
SINK_PAGES, RECENT_TOKENS = 1, 64
METHODS = {
    "gpu-only": None,
    "offload-fetch": dict(mode="dense", migrate=False, fetch_all=True),
    "static-dense": dict(mode="dense", migrate=False, pcie_share=0.0),
    "megatier-dense": dict(mode="dense", migrate=True),
    "sparse-offload-fetch": dict(mode="sparse", migrate=False, sparse_misses="fetch"),
    "static-sparse": dict(mode="sparse", migrate=False),
    "megatier-sparse": dict(mode="sparse", migrate=True),
    "megatier-sparse-cpu": dict(mode="sparse", migrate=True, sparse_misses="cpu"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Workload:
    """Hot page columns per (sequence, layer), and how they drift."""

    def __init__(self, batch: int, pages: int, layers: int, budget: float, seed: int):
        self.rng = np.random.default_rng(seed)
        forced = forced_columns(np.array([pages]), pages, SINK_PAGES, recent_pages_for(RECENT_TOKENS, PAGE_SIZE))[0]
        self.free_cols = np.flatnonzero(~forced)
        count = min(len(self.free_cols), max(0, math.ceil(budget * pages) - int(forced.sum())))
        self.hot = [
            [self.rng.choice(self.free_cols, count, replace=False) for _ in range(layers)] for _ in range(batch)
        ]

    def drift(self) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """Swap a quarter of every hot set for cold columns: (seq, layer, cooled, heated) per set."""
        moves = []
        for b, sets in enumerate(self.hot):
            for layer, hot in enumerate(sets):
                k = max(1, len(hot) // 4) if len(hot) else 0
                cold = np.setdiff1d(self.free_cols, hot)
                if not k or len(cold) < k:
                    continue
                out = self.rng.choice(len(hot), k, replace=False)
                heated = self.rng.choice(cold, k, replace=False)
                cooled = hot[out].copy()
                hot[out] = heated
                moves.append((b, layer, cooled, heated))
        return moves


def make_pools(cfg, device, batch: int, context: int, hbm_fraction: float, extra_tokens: int) -> TieredPools:
    per_seq = math.ceil((context + extra_tokens + 1) / PAGE_SIZE)
    total = batch * per_seq
    page_bytes = cfg.kv_bytes_per_token(torch.bfloat16) * PAGE_SIZE
    hbm = max(2, round(total * hbm_fraction))
    dram = total - hbm + 2 * max(1, min(64, hbm // 32)) + 2
    return TieredPools(
        cfg, page_size=PAGE_SIZE, dtype=torch.bfloat16, device=device, hbm_bytes=hbm * page_bytes,
        dram_bytes=dram * page_bytes,
    )  # fmt: skip


def fill(store, work: Workload, batch: int, context: int, seed: int) -> list[list[int]]:
    """Allocate and write `batch` sequences of `context` synthetic tokens; returns their page tables.

    Placement, as a prefill with fill-order placement would leave it: every sequence's sink and recent
    pages in HBM (every layer), then the rest of HBM in position order across sequences, the remainder
    in DRAM; the same for every layer, so the initial placement knows nothing of the hot sets."""
    n = math.ceil(context / PAGE_SIZE)
    tables = [store.allocator.allocate(n) for _ in range(batch)]
    device = store.device
    gen = torch.Generator(device).manual_seed(seed)
    if isinstance(store, KVCache):
        for b in range(batch):
            pages = torch.tensor(tables[b], device=device)
            store.kv[pages] = torch.randn(store.kv[pages].shape, generator=gen, device=device).to(store.kv.dtype)
            for layer, hot in enumerate(work.hot[b]):
                store.kv[pages[torch.from_numpy(hot).to(device)], layer, 0] *= HOT_SCALE
        return tables
    pools, layers = store.pools, store.num_layers
    forced = forced_columns(np.array([n]), n, SINK_PAGES, recent_pages_for(RECENT_TOKENS, PAGE_SIZE))[0]
    order = [(b, j) for j in np.flatnonzero(forced) for b in range(batch)]
    order += [(b, j) for j in np.flatnonzero(~forced) for b in range(batch)]
    room = (pools.capacity(HBM) - pools.reserve[HBM]) // layers
    for i, (b, j) in enumerate(order):
        for layer in range(layers):
            pools.assign(tables[b][j], layer, HBM if i < room else DRAM)
    store._refresh_maps()
    for b in range(batch):
        pages = np.array(tables[b])
        page_ids = torch.from_numpy(pages).to(device)
        for layer in range(layers):
            kv = torch.randn((n, *pools.slice_shape), generator=gen, device=device).to(torch.bfloat16)
            kv[torch.from_numpy(work.hot[b][layer]).to(device), 0, 0] *= HOT_SCALE
            for tier, pool in ((HBM, pools.hbm.kv), (DRAM, pools.dram)):
                cols = np.flatnonzero(pools.tier[pages, layer] == tier)
                if len(cols):
                    src = torch.from_numpy(cols.astype(np.int32)).to(device)
                    dst = torch.from_numpy(pools.slot[pages[cols], layer]).to(device)
                    copy_slices(kv, pool, src, dst)
            store.meta.set_from_keys(page_ids, kv[:, 0, 0], torch.full((n,), PAGE_SIZE, device=device), layer)
        store.importance.reset(page_ids)
    _sync(device)
    return tables


def drift(store, work: Workload, tables: list[list[int]]) -> None:
    """Apply one drift of the hot sets to the KV where it lives (and to the page metadata)."""
    moves = work.drift()
    device = store.device
    if isinstance(store, KVCache):
        for b, layer, cooled, heated in moves:
            pages = torch.tensor(tables[b], device=device)
            store.kv[pages[torch.from_numpy(cooled).to(device)], layer, 0] /= HOT_SCALE
            store.kv[pages[torch.from_numpy(heated).to(device)], layer, 0] *= HOT_SCALE
        return
    pools = store.pools
    pools.wait_all()  # no slice is being copied while its bytes change
    for b, layer, cooled, heated in moves:
        pages = np.array(tables[b])
        for cols, factor in ((cooled, 1 / HOT_SCALE), (heated, HOT_SCALE)):
            page_ids = pages[cols]
            for tier, pool in ((HBM, pools.hbm.kv), (DRAM, pools.dram)):
                mine = page_ids[pools.tier[page_ids, layer] == tier]
                if not len(mine):
                    continue
                slots = torch.from_numpy(pools.slot[mine, layer]).to(device)
                index = torch.arange(len(mine), dtype=torch.int32, device=device)
                staged = torch.empty((len(mine), *pools.slice_shape), dtype=pools.dtype, device=device)
                copy_slices(pool, staged, slots, index)
                staged[:, 0, 0] *= factor
                copy_slices(staged, pool, index, slots)
            store.meta.minmax[torch.from_numpy(page_ids).to(device), layer] *= factor
    _sync(device)


def run_method(cfg, weights, pools: TieredPools | None, method: str, args, context: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = math.ceil(context / PAGE_SIZE)
    work = Workload(args.batch, n, cfg.num_layers, args.kv_sparse_budget, args.seed)
    spec = METHODS[method]
    if method == "megatier-dense" and args.pcie_share is not None:  # a fixed share instead of the balancer
        spec = spec | {"pcie_share": args.pcie_share}
    if spec is None:
        extra = args.steps * args.repeats + 64
        pages = args.batch * math.ceil((context + extra) / PAGE_SIZE) + 1
        store = KVCache.allocate(cfg, pages, PAGE_SIZE, torch.bfloat16, device)
    else:
        store = TieredKV(
            cfg, page_size=PAGE_SIZE, dtype=torch.bfloat16, device=device, hbm_bytes=0, pools=pools,
            sparse_budget=args.kv_sparse_budget, residency_bonus=args.kv_sparse_residency_bonus,
            sink_pages=SINK_PAGES, recent_tokens=RECENT_TOKENS,
            migration_bytes=int(args.migration_mib * 2**20) if args.migration_mib else None, **spec,
        )  # fmt: skip
    ex = GraphExecutor(cfg, weights, cache=store)
    tables = fill(store, work, args.batch, context, args.seed)
    ctx = [context] * args.batch
    gen = torch.Generator().manual_seed(args.seed)
    hit_curve: list[float] = []
    tiered = isinstance(store, TieredKV)

    def step() -> float:
        for b in range(args.batch):
            if ctx[b] // PAGE_SIZE >= len(tables[b]):
                tables[b] += store.allocator.allocate(1)
        tokens = torch.randint(cfg.vocab_size, (args.batch,), generator=gen).tolist()
        before = (store.stats.hbm_hits, store.stats.selected_slices) if tiered else (0, 0)
        _sync(device)
        t0 = time.perf_counter()
        ex.forward(StepBatch(tokens, list(ctx), [1] * args.batch, [list(t) for t in tables]))
        _sync(device)
        seconds = time.perf_counter() - t0
        if tiered:
            selected = store.stats.selected_slices - before[1]
            hit_curve.append((store.stats.hbm_hits - before[0]) / selected if selected else 1.0)
        for b in range(args.batch):
            ctx[b] += 1
        return seconds

    sparse_migrating = spec is not None and spec["mode"] == "sparse" and spec["migrate"]
    warmup = args.warmup if args.warmup is not None else 4
    if sparse_migrating and args.warmup is None:  # until migration has had time to bring the hot sets in
        hot_slices = args.batch * cfg.num_layers * len(work.hot[0][0])
        warmup = min(120, hot_slices // max(1, store.migration_bytes // store.pools.slice_bytes) + 10)
    for i in range(warmup):
        step()
        if (i + 1) % args.drift_every == 0:
            drift(store, work, tables)
    if tiered:
        store.stats = TierStats()
        store.stats.step_s = 0.0
    times = []
    for i in range(args.steps * args.repeats):
        times.append(step())
        if (i + 1) % args.drift_every == 0:
            drift(store, work, tables)
    median = statistics.median(times)
    result = {
        "method": method,
        "context": context,
        "step_ms": 1e3 * median,
        "step_ms_p10_p90": [1e3 * float(np.percentile(times, 10)), 1e3 * float(np.percentile(times, 90))],
        "tokens_per_s": args.batch / median,
        "timed_steps": len(times),
        "warmup_steps": warmup,
        "graph_captured": bool(ex.graphs),
    }
    if tiered:
        result |= {
            "hit_rate_per_step": [round(h, 4) for h in hit_curve],
            "pcie_share": store.balancer.share,
            "migration_budget_bytes": store.migration_bytes,
            "dram_huge_page_fraction": huge_page_fraction(store.pools.dram),
            **store.stats.as_dict(),
        }
        for table in tables:
            store.allocator.free(table)
        store.pools.wait_all()
    print(
        f"  {method:20s} ctx {context:6d}  {result['step_ms']:9.2f} ms/step  {result['tokens_per_s']:9.1f} tok/s"
        + (
            f"  hit {result['hbm_hit_rate']:.3f}  cpu {result['cpu_attention_ms_per_step']:.1f} ms"
            f" ({100 * result['cpu_busy_fraction']:.0f}% busy, {result['cpu_attention_GBps']:.0f} GB/s)  share {result['pcie_share']:.2f}"
            f"  moved {result['migrated_bytes_per_step'] / 2**20:.1f} MiB/step"
            if tiered
            else ""
        ),
        flush=True,
    )
    return result


def check_exactness(cfg, weights, device) -> dict:
    """Logits of every lossless tiered method against all-HBM on the same KV and tokens, one decode step
    (sparse with a budget of the whole context is lossless too)."""
    args = argparse.Namespace(
        batch=4, kv_sparse_budget=1.0, seed=1, steps=1, repeats=1, warmup=0, drift_every=10**9, pcie_share=None
    )
    context = 1024
    logits = {}
    for name, spec in [("gpu-only", None), ("megatier-dense", dict(mode="dense", pcie_share=0.25))]:
        pools = None if spec is None else make_pools(cfg, device, args.batch, context, 0.25, 8)
        work = Workload(args.batch, math.ceil(context / PAGE_SIZE), cfg.num_layers, args.kv_sparse_budget, args.seed)
        if spec is None:
            store = KVCache.allocate(cfg, args.batch * (context // PAGE_SIZE + 2), PAGE_SIZE, torch.bfloat16, device)
        else:
            store = TieredKV(
                cfg, page_size=PAGE_SIZE, dtype=torch.bfloat16, device=device, hbm_bytes=0, pools=pools, **spec
            )
        ex = GraphExecutor(cfg, weights, cache=store)
        tables = fill(store, work, args.batch, context, args.seed)
        for b in range(args.batch):
            tables[b] += store.allocator.allocate(1)
        logits[name] = ex.forward(StepBatch(list(range(args.batch)), [context] * args.batch, [1] * args.batch, tables))
    ref, got = logits["gpu-only"].float(), logits["megatier-dense"].float()
    return {
        "rel_l2_logits": ((got - ref).norm() / ref.norm()).item(),
        "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def run_tiers(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run only
    cfg = load_config(resolve_model(args.model))
    weights = dummy_weights(cfg, args.seed, torch.bfloat16, device)
    methods = args.methods or list(METHODS)
    results: dict = {}
    if device.type == "cuda":
        results |= {"copy_GBps": copy_bandwidth(device) / 1e9, "read_GBps": read_bandwidth(device) / 1e9}
    if args.micro:
        from megatier.bench.tier_micro import run_micro

        results["micro"] = run_micro(cfg, device)
    if args.check:
        results["check"] = check_exactness(cfg, weights, device)
        print(f"  exactness: {results['check']}", flush=True)
    runs = []
    extra = args.steps * args.repeats + 130
    for context in args.context:
        total_gib = args.batch * context * cfg.kv_bytes_per_token(torch.bfloat16) / 2**30
        print(f"{args.model}: batch {args.batch} x {context} tokens = {total_gib:.1f} GiB of KV", flush=True)
        if "gpu-only" in methods:
            try:
                runs.append({**run_method(cfg, weights, None, "gpu-only", args, context), "hbm_fraction": 1.0})
            except torch.OutOfMemoryError:
                print("  gpu-only: does not fit", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for frac in args.hbm_fraction:
            pools = make_pools(cfg, device, args.batch, context, frac, extra)
            for method in [m for m in methods if m != "gpu-only"]:
                runs.append({**run_method(cfg, weights, pools, method, args, context), "hbm_fraction": frac})
            pools.close()
            del pools
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["runs"] = runs
    results["speedups"] = speedups(runs)
    config = {
        "model": args.model,
        "batch": args.batch,
        "contexts": args.context,
        "hbm_fractions": args.hbm_fraction,
        "kv_sparse_budget": args.kv_sparse_budget,
        "kv_sparse_residency_bonus": args.kv_sparse_residency_bonus,
        "page_size": PAGE_SIZE,
        "hot_key_scale": HOT_SCALE,
        "drift_every": args.drift_every,
        "migration_mib": args.migration_mib,
        "pcie_share": args.pcie_share,
        "methods": methods,
        "executor": "graph",
    }
    rec = record("tiers", device, config, results)
    if args.json:
        write_json(args.json, rec)
    if args.plot_dir:
        from megatier.bench.tier_plots import plot_tiers

        plot_tiers(rec, args.plot_dir)
    return rec


def speedups(runs: list[dict]) -> list[dict]:
    """Per (context, HBM fraction): megatier dense / sparse against their baselines, same run."""
    out = []
    for key in sorted({(r["context"], r["hbm_fraction"]) for r in runs if r["hbm_fraction"] < 1}):
        by = {r["method"]: r["tokens_per_s"] for r in runs if (r["context"], r["hbm_fraction"]) == key}
        row = {"context": key[0], "hbm_fraction": key[1]}
        for name, num, den in [
            ("dense_vs_offload_fetch", "megatier-dense", "offload-fetch"),
            ("sparse_vs_offload_fetch", "megatier-sparse", "offload-fetch"),
            ("sparse_vs_sparse_offload_fetch", "megatier-sparse", "sparse-offload-fetch"),
        ]:
            if num in by and den in by:
                row[name] = by[num] / by[den]
        out.append(row)
        print(f"  speedups at ctx {key[0]}, HBM {key[1]:g}: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in row.items() if k.endswith("fetch")), flush=True)  # fmt: skip
    return out
