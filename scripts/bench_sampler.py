"""GPU microbenchmark of the sampler alone: the torch path (the sampler before the fused kernels) against
the fused kernels, launched eagerly and replayed as a CUDA graph; vocabularies 128256 (Llama 3) and 49152
(SmolLM2), batches 1/8/64, greedy and T=0.7/top-p 0.95.

Per case: device µs per call (CUDA events around 20 back-to-back calls, median of 7 such loops; a path
whose host work is slower than its kernels shows its host time here, as in the engine loop) and host µs
per call (wall time to queue those calls). Also checks on the device that greedy tokens are the same on
every path and sampled ones in range. Stops starting new cases after --budget seconds.

    MEGATIER_COMMIT=$(git rev-parse --short HEAD) OUT=bench/results python scripts/bench_sampler.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from megatier.sampling import Sampler, SampleRow, SamplingParams

MODES = {
    "greedy": SamplingParams(temperature=0),
    "t0.7_top_p0.95": SamplingParams(temperature=0.7, top_p=0.95),
}
PATHS = {  # name -> Sampler options
    "torch": dict(fused=False),
    "fused_eager": dict(fused=True, capture=False),
    "fused_graph": dict(fused=True, capture=True),
}


def time_path(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, calls: int, loops: int):
    """(median device µs per call, median host µs per call, tokens of one call)."""
    keys = [object() for _ in range(logits.shape[0])]
    position = 0

    def queue(n: int) -> None:
        nonlocal position
        for _ in range(n):
            sampler.sample(logits, [SampleRow(k, params, i, position, []) for i, k in enumerate(keys)])
            position += 1

    queue(3)  # compiles, first use, capture
    torch.cuda.synchronize()
    device, host = [], []
    for _ in range(loops):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        queue(calls)
        host.append((time.perf_counter() - t0) / calls * 1e6)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end) / calls * 1e3)
    tokens = [
        t for t, _ in sampler.sample(logits, [SampleRow(k, params, i, 0, []) for i, k in enumerate(keys)]).result()
    ]
    return statistics.median(device), statistics.median(host), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="128256,49152")
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--loops", type=int, default=7)
    ap.add_argument("--budget", type=float, default=50.0, help="seconds after which no new case starts")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sampler needs a CUDA GPU")
    device = torch.device("cuda")
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results, skipped, mismatches, graph_errors = [], [], [], {}
    for vocab in (int(v) for v in args.vocab.split(",")):
        samplers = {name: Sampler(vocab, device, **opts) for name, opts in PATHS.items()}
        for batch in (int(b) for b in args.batch.split(",")):
            generator = torch.Generator(device).manual_seed(batch)
            logits = torch.randn(batch, vocab, device=device, generator=generator) * 2
            for mode, params in MODES.items():
                case = dict(vocab=vocab, batch=batch, mode=mode)
                if time.perf_counter() - t_start > args.budget:
                    skipped.append(case)
                    continue
                row = dict(case)
                tokens = {}
                for name, sampler in samplers.items():
                    dev, host, tokens[name] = time_path(sampler, logits, params, args.calls, args.loops)
                    row[f"{name}_device_us"], row[f"{name}_host_us"] = round(dev, 1), round(host, 1)
                if params.greedy and len({tuple(t) for t in tokens.values()}) != 1:
                    mismatches.append(case)
                if not all(0 <= t < vocab for ts in tokens.values() for t in ts):
                    mismatches.append(case)
                row["speedup_graph_vs_torch"] = round(row["torch_device_us"] / row["fused_graph_device_us"], 2)
                results.append(row)
                print(json.dumps(row), flush=True)
        graph_errors[vocab] = samplers["fused_graph"].graph_error
    record = dict(
        commit=os.environ.get("MEGATIER_COMMIT", "unknown"),
        device=torch.cuda.get_device_name(device),
        torch=torch.__version__,
        method=f"CUDA events around {args.calls} back-to-back sample() calls, median of {args.loops} loops",
        graph_errors=graph_errors,
        results=results,
        skipped=skipped,
        greedy_or_range_mismatches=mismatches,
        seconds=round(time.perf_counter() - t_start, 1),
    )
    path = out / "bench_sampler.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}; mismatches: {mismatches or 'none'}; graph errors: {graph_errors}")


if __name__ == "__main__":
    main()
