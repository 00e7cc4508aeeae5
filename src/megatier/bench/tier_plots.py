"""PNG plots of a `megatier bench tiers` record: throughput vs context and vs HBM budget, hit rate vs step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _lines(ax, runs, x_key, methods):
    for method in methods:
        pts = sorted((r[x_key], r["tokens_per_s"]) for r in runs if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (batch total)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_tiers(rec: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, runs = rec["config"], rec["results"]["runs"]
    model, methods = Path(cfg["model"]).name, cfg["methods"]
    written = []
    title = f"{model}, batch {cfg['batch']}, {rec['device']}"

    frac = cfg["hbm_fractions"][0]
    at_frac = [r for r in runs if r["hbm_fraction"] in (frac, 1.0)]
    if len({r["context"] for r in at_frac}) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _lines(ax, at_frac, "context", methods)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"context tokens per sequence (HBM budget = {frac:g} of the KV)")
        ax.set_title(title, fontsize=9)
        written.append(out_dir / f"tiers_{model}_vs_context.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

    longest = max(cfg["contexts"])
    at_ctx = [r for r in runs if r["context"] == longest and r["method"] != "gpu-only"]
    if len({r["hbm_fraction"] for r in at_ctx}) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _lines(ax, at_ctx, "hbm_fraction", [m for m in methods if m != "gpu-only"])
        for r in runs:
            if r["context"] == longest and r["method"] == "gpu-only":
                ax.axhline(r["tokens_per_s"], color="k", ls="--", lw=1, label="gpu-only (all KV in HBM)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"HBM budget / total KV (context {longest})")
        ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
        written.append(out_dir / f"tiers_{model}_vs_hbm.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

    curves = [r for r in runs if r["method"] == "megatier-sparse"]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in curves:
            ax.plot(r["hit_rate_per_step"], label=f"ctx {r['context']}, HBM {r['hbm_fraction']:g}")
        ax.set_xlabel("decode step (migration warm-up, then timed steps)")
        ax.set_ylabel("HBM hit rate of selected pages")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
        written.append(out_dir / f"tiers_{model}_hit_rate.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return written
