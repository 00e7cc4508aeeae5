"""`megatier bench latency`: per-step decode latency of one batch, through the whole engine.

Each timed run prefills `batch` random prompts of `input_len` tokens and decodes `output_len` tokens
greedily with EOS ignored. The decode figure is (end - first token) / (output_len - 1): everything a step
costs, embedding, sampling and bookkeeping included. On CUDA the device's copy bandwidth is measured in
the same run, and achieved bandwidth counts weight bytes plus the KV bytes each step reads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatier.bench.common import copy_bandwidth, cuda_time, record, write_json
from megatier.errors import MegatierError
from megatier.sampling import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(llm, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(seconds to the first token of every sequence, seconds per decode step after it)."""
    engine, device = llm.engine, llm.device
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    _sync(device)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    produced = dict.fromkeys(ids, 0)
    t_first = None
    while engine.has_unfinished():
        for update in engine.step():
            produced[update.request_id] += len(update.new_token_ids)
        if t_first is None and all(produced.values()):
            _sync(device)
            t_first = time.perf_counter()
    _sync(device)
    t_end = time.perf_counter()
    return t_first - t0, (t_end - t_first) / max(output_len - 1, 1)


def run_latency(args: argparse.Namespace) -> dict:
    from megatier.cli import build_llm

    llm = build_llm(args)
    cfg = llm.config
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, cfg.vocab_size, (args.input_len,), generator=gen).tolist() for _ in range(args.batch)]
    time_generation(llm, prompts, min(args.output_len, 8))  # warm-up: compilation, graph capture
    runs = [time_generation(llm, prompts, args.output_len) for _ in range(args.iters)]
    ttft = statistics.median(r[0] for r in runs)
    step = statistics.median(r[1] for r in runs)

    weight_bytes = llm.stats.weight_bytes
    mean_context = args.input_len + args.output_len / 2
    kv_bytes = int(args.batch * mean_context * cfg.kv_bytes_per_token(llm.dtype))
    results = {
        "backend": llm.backend,
        "ttft_ms": ttft * 1e3,
        "decode_step_us": step * 1e6,
        "tokens_per_s": args.batch / step,
        "achieved_GBps": (weight_bytes + kv_bytes) / step / 1e9,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
    }
    if llm.device.type == "cuda":
        bw = copy_bandwidth(llm.device)
        results["copy_GBps"] = bw / 1e9
        results["pct_of_copy_bw"] = 100 * (weight_bytes + kv_bytes) / step / bw
        results["floor_us"] = (weight_bytes + kv_bytes) / bw * 1e6
    baselines = [b for b in (args.baselines or "").split(",") if b]
    if baselines:
        results["baselines"] = run_baselines(llm, baselines, prompts, args.output_len)
        for b in results["baselines"].values():
            b["megatier_speedup"] = b["decode_step_us"] / results["decode_step_us"]
    config = {
        "model": str(llm.model_path),
        "dtype": str(llm.dtype).removeprefix("torch."),
        "batch": args.batch,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "iters": args.iters,
    }
    rec = record("latency", llm.device, config, results)
    print(f"{rec['device']} | {llm.backend} | batch {args.batch} | {args.input_len} in / {args.output_len} out")
    print(f"  decode step   {results['decode_step_us']:9.1f} us   ({results['tokens_per_s']:.1f} tokens/s)")
    print(f"  first token   {results['ttft_ms']:9.2f} ms")
    print(f"  achieved      {results['achieved_GBps']:9.1f} GB/s", end="")
    if "copy_GBps" in results:
        print(
            f"   ({results['pct_of_copy_bw']:.1f}% of {results['copy_GBps']:.0f} GB/s copy; floor {results['floor_us']:.0f} us)"
        )
    else:
        print()
    for name, b in results.get("baselines", {}).items():
        print(f"  {name:13} {b['decode_step_us']:9.1f} us   (megatier is {b['megatier_speedup']:.2f}x faster)")
    if args.json:
        write_json(args.json, rec)
    return rec


def run_baselines(llm, names: list[str], prompts: list[list[int]], output_len: int) -> dict[str, dict]:
    """Decode-step time of each named baseline on the same weights and workload, in this process."""
    from megatier.bench import baselines
    from megatier.loader import dummy_weights, load_safetensors_weights

    if llm.device.type != "cuda":
        raise MegatierError("baselines are timed on CUDA only")
    cfg = llm.config
    if llm.model_path.suffix == ".json":
        weights = dummy_weights(cfg, llm.seed, llm.dtype, llm.device)
    else:
        weights = load_safetensors_weights(llm.model_path, cfg)
    ids = torch.tensor(prompts, device=llm.device)
    out = {}
    for name in names:
        if name == "hf":
            model = baselines.hf_model(llm.model_path, weights, llm.device, llm.dtype)
            step = baselines.hf_decode_step(model, ids, output_len)
            del model
        elif name == "torch-graph":
            dec = baselines.TorchGraphDecoder(
                cfg, weights, len(prompts), ids.shape[1] + output_len + 1, llm.device, llm.dtype
            )
            dec.fill_context(ids.shape[1])
            dec.capture()
            times = cuda_time(lambda dec=dec: dec.replay(output_len), iters=5)
            step = statistics.median(times) / output_len
            del dec
        else:
            raise MegatierError(f"unknown baseline {name!r}: choose from hf, torch-graph")
        out[name] = {"decode_step_us": step * 1e6, "tokens_per_s": len(prompts) / step}
        torch.cuda.empty_cache()
    return out
