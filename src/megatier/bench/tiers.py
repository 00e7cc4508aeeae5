"""`megatier bench tiers`: decode throughput with a KV cache larger than the HBM budget, against baselines.

Every method runs the same model (dummy weights of a real shape, the reference executor's matmuls) over
the same synthetic KV, in one process:
- gpu-only: all KV in HBM (the ceiling; only when it fits);
- offload-fetch: KV beyond the HBM budget lives in DRAM and every DRAM page is copied to the GPU each
  step, pipelined by layer (the vLLM / DeepSpeed offloading analogue);
- static-dense / static-sparse: attention computed where each page lives, placement fixed at fill time
  (PAM's L-PIM / LS-PIM baselines); static-dense leaves all DRAM pages to the CPU;
- megatier-dense: as static-dense plus the bandwidth-balanced PCIe share of DRAM pages;
- megatier-sparse: sparse selection plus importance-driven online migration; the few selected pages
  still in DRAM are read by the GPU kernel over PCIe (zero-copy), so a step never waits for the host;
  megatier-sparse-cpu has the CPU read them instead (one host round trip per layer).

The KV is synthetic, with a stated locality model: the pages of each sequence that a 1/8 budget selects
(besides sinks and the recent window) carry keys 4x larger than the rest, so they win the selection for
any query, at random positions unknown to the initial placement, which fills HBM in position order. The
real-model check of locality and accuracy is scripts/passkey_tiers.py.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from megatier.bench.common import copy_bandwidth, record, write_json
from megatier.config import load_config
from megatier.executors.base import StepBatch
from megatier.executors.tiered import TieredExecutor
from megatier.kv.attention import TierStats
from megatier.kv.tiers import DRAM, HBM, TieredKV
from megatier.loader import dummy_weights, resolve_model

PAGE_SIZE = 16
HOT_SCALE = 4.0
METHODS = {
    "gpu-only": dict(mode="dense", migrate=False),
    "offload-fetch": dict(mode="dense", migrate=False, fetch_all=True),
    "static-dense": dict(mode="dense", migrate=False, pcie_share=0.0),
    "megatier-dense": dict(mode="dense", migrate=True),
    "static-sparse": dict(mode="sparse", migrate=False),
    "megatier-sparse": dict(mode="sparse", migrate=True),
    "megatier-sparse-cpu": dict(mode="sparse", migrate=True, sparse_misses="cpu"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_tiers(cfg, device, batch: int, context: int, hbm_fraction: float | None, extra_tokens: int) -> TieredKV:
    """Pools for `batch` sequences of `context` + `extra_tokens` tokens; hbm_fraction None: all in HBM."""
    per_seq = math.ceil((context + extra_tokens + 1) / PAGE_SIZE)
    total = batch * per_seq
    page_bytes = cfg.kv_bytes_per_token(torch.bfloat16) * PAGE_SIZE
    if hbm_fraction is None:
        hbm, dram = total + 1, 0
    else:
        hbm = max(2, round(total * hbm_fraction))
        dram = total - hbm + 2 * max(1, min(64, hbm // 32)) + 2
    return TieredKV(
        cfg,
        page_size=PAGE_SIZE,
        dtype=torch.bfloat16,
        device=device,
        hbm_bytes=hbm * page_bytes,
        dram_bytes=dram * page_bytes,
    )


def fill(ex: TieredExecutor, batch: int, context: int, budget: float, seed: int) -> list[list[int]]:
    """Allocate and write `batch` sequences of `context` synthetic tokens; returns their page tables.

    Placement, as a prefill with fill-order placement would leave it: every sequence's sink and recent
    pages in HBM, then the rest of HBM in position order across sequences, the remainder in DRAM
    (sequence after sequence, so a sequence's DRAM pages are consecutive slots)."""
    tiers, attn = ex.tiers, ex.attn
    n = math.ceil(context / PAGE_SIZE)
    tables = [tiers.allocator.allocate(n) for _ in range(batch)]
    forced = np.zeros(n, dtype=bool)
    forced[: attn.sink_pages] = True
    forced[max(0, n - attn.recent_pages) :] = True
    rng = np.random.default_rng(seed)
    hot_count = max(0, math.ceil(budget * n) - int(forced.sum()))
    room = tiers.capacity(HBM) - tiers.reserve[HBM]
    order = [(b, j) for j in np.flatnonzero(forced) for b in range(batch)]
    order += [(b, j) for j in np.flatnonzero(~forced) for b in range(batch)]
    in_hbm = {bj for bj in order[:room]}
    for b, j in order[:room]:
        tiers.assign(tables[b][j], HBM)
    gen = torch.Generator(tiers.device).manual_seed(seed)
    for b in range(batch):
        cols = [j for j in range(n) if (b, j) not in in_hbm]
        for j in cols:
            tiers.assign(tables[b][j], DRAM)
        kv = torch.randn((n, *tiers.page_shape), generator=gen, device=tiers.device, dtype=torch.bfloat16)
        hot = rng.choice(np.flatnonzero(~forced), size=min(hot_count, int((~forced).sum())), replace=False)
        kv[torch.from_numpy(hot).to(tiers.device), :, 0] *= HOT_SCALE
        pages = np.array(tables[b])
        hbm_cols = [j for j in range(n) if (b, j) in in_hbm]
        slots = torch.from_numpy(tiers.slot[pages[hbm_cols]].astype(np.int64)).to(tiers.device)
        tiers.hbm.kv[slots] = kv[hbm_cols]
        if cols:
            first = int(tiers.slot[pages[cols[0]]])
            tiers.dram[first : first + len(cols)].copy_(kv[cols])
        page_ids = torch.from_numpy(pages).to(tiers.device)
        ex.attn.meta.set_from_keys(page_ids, kv[:, :, 0], torch.full((n,), PAGE_SIZE, device=tiers.device))
        ex.attn.importance.reset(page_ids)
    _sync(tiers.device)
    return tables


def run_method(cfg, weights, tiers: TieredKV, method: str, args, context: int) -> dict:
    spec = dict(METHODS[method])
    mode, migrate = spec.pop("mode"), spec.pop("migrate")
    ex = TieredExecutor(
        cfg, weights, tiers=tiers, mode=mode, migrate=migrate, sparse_fraction=args.budget, cpu_threads=None, **spec
    )
    tables = fill(ex, args.batch, context, args.budget, args.seed)
    ctx = [context] * args.batch
    gen = torch.Generator().manual_seed(args.seed)
    hit_curve: list[float] = []

    def step() -> None:
        for b in range(args.batch):
            if ctx[b] // PAGE_SIZE >= len(tables[b]):
                tables[b] += tiers.allocator.allocate(1)
        tokens = torch.randint(cfg.vocab_size, (args.batch,), generator=gen).tolist()
        before = (ex.stats.hbm_hits, ex.stats.selected_pages)
        ex.forward(StepBatch(tokens, list(ctx), [1] * args.batch, [list(t) for t in tables]))
        selected = ex.stats.selected_pages - before[1]
        hit_curve.append((ex.stats.hbm_hits - before[0]) / selected if selected else 1.0)
        for b in range(args.batch):
            ctx[b] += 1

    sparse = mode == "sparse"
    hot_pages = args.batch * math.ceil(args.budget * context / PAGE_SIZE)
    warmup = 3 if not (sparse and migrate) else min(200, hot_pages // max(1, tiers.reserve[HBM]) + 10)
    warmup = warmup if args.warmup is None else args.warmup
    for _ in range(warmup):
        step()
    ex.attn.stats = TierStats()
    steps = args.steps * (4 if sparse else 1)
    _sync(tiers.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(tiers.device)
    seconds = (time.perf_counter() - t0) / steps
    result = {
        "method": method,
        "context": context,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": args.batch / seconds,
        "warmup_steps": warmup,
        "hit_rate_per_step": [round(h, 4) for h in hit_curve],
        **ex.stats.as_dict(),
        "bandwidth_estimates_GBps": {k: v / 1e9 for k, v in ex.attn.bw.items()},
    }
    for table in tables:
        tiers.allocator.free(table)
    tiers.wait_all()
    print(
        f"  {method:16s} ctx {context:6d}  {result['step_ms']:9.2f} ms/step  {result['tokens_per_s']:9.1f} tok/s"
        f"  hit {result['hbm_hit_rate']:.3f}  cpu {result['cpu_attention_ms_per_step']:.1f} ms"
        f"  moved {result['migrated_bytes_per_step'] / 2**20:.1f} MiB/step",
        flush=True,
    )
    return result


def check_exactness(cfg, weights, device) -> dict:
    """Logits of tiered dense (HBM + PCIe share + CPU) against all-HBM on the same KV, one decode step."""
    args = argparse.Namespace(batch=4, budget=0.125, seed=1, warmup=0)
    context = 2048
    logits, attn = {}, {}
    for name, frac in (("gpu-only", None), ("megatier-dense", 0.25)):
        tiers = make_tiers(cfg, device, args.batch, context, frac, 4)
        spec = dict(METHODS[name])
        mode, migrate = spec.pop("mode"), spec.pop("migrate")
        ex = TieredExecutor(cfg, weights, tiers=tiers, mode=mode, migrate=migrate, **spec)
        tables = fill(ex, args.batch, context, args.budget, args.seed)
        for b in range(args.batch):
            tables[b] += tiers.allocator.allocate(1)
        batch = StepBatch(list(range(args.batch)), [context] * args.batch, [1] * args.batch, tables)
        logits[name] = ex.forward(batch).float()
        # One layer's attention alone, same query, same KV: the merge's own error, no model amplification.
        q = torch.randn(
            (args.batch, cfg.num_heads, cfg.head_dim), generator=torch.Generator(device).manual_seed(7), device=device
        )
        with torch.inference_mode():  # the executor's buffers are inference tensors
            ex.attn.begin_step(batch)
            attn[name] = ex.attn.decode(0, q.to(torch.bfloat16)).float()
            ex.attn.end_step()
        del ex, tiers
        _empty_cache()
    ref, got = logits["gpu-only"], logits["megatier-dense"]
    rel = ((got - ref).norm() / ref.norm()).item()
    rel_attn = ((attn["megatier-dense"] - attn["gpu-only"]).norm() / attn["gpu-only"].norm()).item()
    return {
        "rel_l2_attention_layer0": rel_attn,
        "rel_l2_logits": rel,
        "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def run_tiers(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run only
    cfg = load_config(resolve_model(args.model))
    weights = dummy_weights(cfg, args.seed, torch.bfloat16, device)
    methods = args.methods or list(METHODS)
    results: dict = {"copy_GBps": copy_bandwidth(device) / 1e9 if device.type == "cuda" else None}
    if args.micro and device.type == "cuda":
        from megatier.bench.tier_micro import run_micro

        results["micro"] = run_micro(cfg, device)
    if args.check:
        results["check"] = check_exactness(cfg, weights, device)
        print(f"  exactness: {results['check']}", flush=True)
    runs = []
    extra = args.steps * 4 + (250 if args.warmup is None else args.warmup)
    for context in args.context:
        total_gib = args.batch * context * cfg.kv_bytes_per_token(torch.bfloat16) / 2**30
        print(f"{args.model}: batch {args.batch} x {context} tokens = {total_gib:.1f} GiB of KV", flush=True)
        if "gpu-only" in methods:
            try:
                tiers = make_tiers(cfg, device, args.batch, context, None, extra)
                runs.append({**run_method(cfg, weights, tiers, "gpu-only", args, context), "hbm_fraction": 1.0})
                del tiers
            except torch.OutOfMemoryError:
                print("  gpu-only: does not fit", flush=True)
            _empty_cache()
        for frac in args.hbm_fraction:
            tiers = make_tiers(cfg, device, args.batch, context, frac, extra)
            for method in [m for m in methods if m != "gpu-only"]:
                runs.append({**run_method(cfg, weights, tiers, method, args, context), "hbm_fraction": frac})
            tiers.close()
            del tiers
            _empty_cache()
    results["runs"] = runs
    config = {
        "model": args.model,
        "batch": args.batch,
        "contexts": args.context,
        "hbm_fractions": args.hbm_fraction,
        "sparse_budget": args.budget,
        "page_size": PAGE_SIZE,
        "hot_key_scale": HOT_SCALE,
        "methods": methods,
    }
    rec = record("tiers", device, config, results)
    if args.json:
        write_json(args.json, rec)
    if args.plot_dir:
        from megatier.bench.tier_plots import plot_tiers

        plot_tiers(rec, args.plot_dir)
    return rec
