"""`megatier bench throughput`: decode tokens/s as the batch grows, at a fixed context, one model load.

For each batch size the engine prefills `batch` random prompts of `input_len` tokens and decodes
`output_len` tokens each (greedy, EOS ignored); tokens/s counts decode tokens over decode time. A PNG
plots step latency and tokens/s against the batch size.
"""

from __future__ import annotations

import argparse

import torch

from megatier.args import EngineArgs
from megatier.bench.common import copy_bandwidth, model_config, record, write_json
from megatier.bench.latency import time_generation
from megatier.llm import LLM


def run_throughput(args: argparse.Namespace) -> dict:
    llm = LLM.from_args(EngineArgs.from_cli(args, max_num_seqs=max(args.batches)))
    cfg = llm.config
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for batch in args.batches:
        prompts = [torch.randint(0, cfg.vocab_size, (args.input_len,), generator=gen).tolist() for _ in range(batch)]
        time_generation(llm, prompts, min(args.output_len, 4))  # warm-up for this batch size
        ttft, step = time_generation(llm, prompts, args.output_len)
        rows.append({"batch": batch, "decode_step_us": step * 1e6, "tokens_per_s": batch / step, "ttft_ms": ttft * 1e3})
        print(
            f"  batch {batch:4}: {step * 1e6:9.1f} us/step  {batch / step:10.1f} tokens/s  (prefill {ttft * 1e3:.0f} ms)"
        )
    results = {"backend": llm.backend, "rows": rows}
    if llm.device.type == "cuda":
        results["copy_GBps"] = copy_bandwidth(llm.device) / 1e9
    config = model_config(llm) | {
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    rec = record("throughput", llm.device, config, results)
    if args.json:
        write_json(args.json, rec)
    if args.plot:
        plot(rec, args.plot)
    return rec


def plot(rec: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rec["results"]["rows"]
    batches = [r["batch"] for r in rows]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(batches, [r["decode_step_us"] for r in rows], "o-", color="tab:blue")
    left.set_xscale("log", base=2)
    left.set_xlabel("batch (sequences)")
    left.set_ylabel("decode step (us)", color="tab:blue")
    right = left.twinx()
    right.plot(batches, [r["tokens_per_s"] for r in rows], "s--", color="tab:red")
    right.set_ylabel("tokens/s", color="tab:red")
    cfg = rec["config"]
    left.set_title(f"{rec['device']}, {rec['results']['backend']}, context {cfg['input_len']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
