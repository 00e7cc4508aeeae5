"""Measure candidate GEMV configurations on the device and keep the fastest, before any graph capture.

Each candidate runs its kernel once per layer over all layers' real weights (so the bytes exceed L2, as
in a decode step), captured in a CUDA graph with PDL between the launches; the time is per launch. The
winner of each (kernel, N, K, block_m) goes into megatier.kernels.gemv.tuned, which every later launch
reads. Used by gpu_graph_check.py.
"""

from __future__ import annotations

import time

import torch

from megatier.executors.graph import GraphExecutor
from megatier.kernels import gemv
from megatier.kernels.gemv import GemvConfig, block_m_for, gemv_norm_logits, gemv_norm_silu, gemv_residual_add
from megatier.kernels.gemv_qkv import gemv_qkv_rope

# (kernel, FMA path?) -> candidates besides the default: (block_n, block_k, num_warps, num_stages)
CANDIDATES = {
    ("qkv", True): [(4, 512, 4, 4), (8, 256, 4, 6), (16, 256, 4, 4)],
    ("residual", True): [(4, 1024, 4, 4), (16, 256, 4, 4), (8, 256, 4, 6)],
    ("silu", True): [(4, 512, 4, 4), (16, 256, 4, 4), (8, 256, 4, 6)],
    ("logits", True): [(16, 512, 4, 4), (64, 128, 4, 4), (32, 128, 4, 6)],
    ("qkv", False): [(16, 128, 4, 6), (16, 512, 4, 3)],
    ("residual", False): [(16, 128, 4, 6), (32, 256, 4, 3)],
    ("silu", False): [(16, 128, 4, 6), (32, 128, 4, 4)],
    ("logits", False): [(32, 256, 4, 4), (128, 64, 4, 4)],
}


def graph_time_us(fn, replays: int = 20) -> float:
    """Device µs per call of `fn`, replayed from a CUDA graph (launch gaps as in a captured step)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def _kernels(ex: GraphExecutor, rows: int) -> list[tuple]:
    """(kernel, N, K, launch(layer), weight bytes per launch) for each decode GEMV at `rows` rows."""
    cfg, w, eps, device = ex.cfg, ex.w, ex.cfg.rms_norm_eps, ex.device
    gen = torch.Generator(device=device).manual_seed(rows)
    residual = torch.randn(rows, cfg.hidden_size, device=device, generator=gen)
    attn = torch.randn(rows, cfg.q_size, device=device, generator=gen).to(w.o.dtype)
    act = torch.randn(rows, cfg.intermediate_size, device=device, generator=gen).to(w.o.dtype)
    seq_lens = torch.full((rows,), 3, dtype=torch.int32, device=device)
    tables = torch.arange(rows, dtype=torch.int32, device=device)[:, None]  # a page of its own per row

    def qkv(layer: int) -> None:
        gemv_qkv_rope(
            residual, w.input_norm[layer], w.qkv[layer], None, seq_lens, tables, ex.cache.kv, layer,
            ex.cos_sin, cfg.num_heads, None, None, eps,
        )  # fmt: skip

    return [
        ("qkv", w.qkv.shape[1], cfg.hidden_size, qkv, w.qkv[0].nbytes),
        ("residual", cfg.hidden_size, cfg.q_size, lambda i: gemv_residual_add(attn, w.o[i], None, residual), w.o[0].nbytes),
        ("silu", cfg.intermediate_size, cfg.hidden_size,
         lambda i: gemv_norm_silu(residual, w.post_norm[i], w.gate_up[i], None, eps), w.gate_up[0].nbytes),
        ("residual", cfg.hidden_size, cfg.intermediate_size,
         lambda i: gemv_residual_add(act, w.down[i], None, residual), w.down[0].nbytes),
        ("logits", cfg.vocab_size, cfg.hidden_size,
         lambda i: gemv_norm_logits(residual, w.final_norm, w.lm_head, eps, logits=False, argmax=True),
         w.lm_head.nbytes),
    ]  # fmt: skip


def sweep(ex: GraphExecutor, rows_list: tuple[int, ...], budget_s: float) -> list[dict]:
    """Time the default and candidate configurations of every decode GEMV at each batch size; set the
    fastest in gemv.tuned. Stops trying candidates once `budget_s` has passed (defaults stay)."""
    layers = range(ex.cfg.num_layers)
    t0, results = time.perf_counter(), []
    for rows in rows_list:
        block_m = block_m_for(rows)
        for kind, n, k, launch, nbytes in _kernels(ex, rows):
            key = (kind, n, k, block_m)
            default = gemv.default_config(kind, n, k, block_m)
            best = None
            for candidate in [default, *(GemvConfig(*c) for c in CANDIDATES[(kind, block_m == 1)])]:
                if candidate is not default and time.perf_counter() - t0 > budget_s:
                    break
                gemv.tuned[key] = candidate
                row = {"kernel": kind, "rows": rows, "N": n, "K": k, "config": list(candidate)}
                try:
                    us = graph_time_us(lambda launch=launch: [launch(i) for i in layers]) / len(layers)
                except Exception as e:  # e.g. out of shared memory: skip the candidate
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    results.append(row)
                    continue
                row |= {"us": us, "GBps": nbytes / us / 1e3}
                results.append(row)
                if best is None or us < best[0]:
                    best = (us, candidate)
            gemv.tuned[key] = best[1] if best else default
            shown = f"{best[0]:.2f} us, {nbytes / best[0] / 1e3:.0f} GB/s" if best else "all failed"
            print(f"  {kind:8s} rows={rows:2d} N={n:6d} K={k:5d}: {gemv.tuned[key]} {shown}", flush=True)
    return results
