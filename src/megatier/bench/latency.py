"""`megatier bench latency`: per-step decode latency of one batch, through the whole engine.

Each timed run prefills `batch` random prompts of `input_len` tokens and decodes `output_len` tokens
with EOS ignored: greedily, or sampled (`--temperature`, `--top-p`, seeded) through the same loop. The decode figure is (end - first token) / (output_len - 1): everything a step
costs, embedding, sampling and bookkeeping included. On CUDA the device's copy bandwidth is measured in
the same run, and achieved bandwidth counts weight bytes (as the executor holds them: FP8 or GGUF blocks
where quantized) plus the KV bytes each step reads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatier.args import EngineArgs
from megatier.bench.common import copy_bandwidth, cuda_time, model_config, read_bandwidth, record, write_json
from megatier.errors import MegatierError
from megatier.llm import LLM
from megatier.sampling import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(
    llm, prompts: list[list[int]], output_len: int, temperature: float = 0.0, top_p: float = 1.0
) -> tuple[float, float]:
    """(seconds until every sequence has its first token, seconds per decode step of the whole batch
    after that). Prompts are prefilled in chunks, so early sequences start decoding while later ones
    prefill; the step time is therefore the time from the last first token to the end, over the tokens
    decoded in it, times the batch size (for one sequence: (end - first token) / (output_len - 1), the
    time per output token as vLLM's benchmarks define it). The first token counts when the host has it:
    no device sync there, since the engine may already have queued the next steps behind the prefill."""
    engine, device = llm.engine, llm.device
    params = [
        SamplingParams(temperature=temperature, top_p=top_p, seed=i, max_tokens=output_len, ignore_eos=True)
        for i in range(len(prompts))
    ]
    _sync(device)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    produced = dict.fromkeys(ids, 0)
    t_first, decoded = None, 0
    while engine.has_unfinished():
        for update in engine.step():
            produced[update.request_id] += len(update.new_token_ids)
            decoded += len(update.new_token_ids) if t_first is not None else 0
        if t_first is None and all(produced.values()):
            t_first = time.perf_counter()
    _sync(device)
    t_end = time.perf_counter()
    return t_first - t0, (t_end - t_first) * len(prompts) / max(decoded, 1)


def measure_case(
    llm,
    batch: int,
    input_len: int,
    output_len: int,
    iters: int,
    seed: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> dict:
    """One (batch, prompt length) case on a loaded LLM: medians of `iters` timed generations."""
    cfg = llm.config
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, cfg.vocab_size, (input_len,), generator=gen).tolist() for _ in range(batch)]
    time_generation(llm, prompts, min(output_len, 8), temperature, top_p)  # warm-up: compilation, graph capture
    runs = [time_generation(llm, prompts, output_len, temperature, top_p) for _ in range(iters)]
    ttft = statistics.median(r[0] for r in runs)
    step = statistics.median(r[1] for r in runs)
    kv_bytes = int(batch * (input_len + output_len / 2) * cfg.kv_bytes_per_token(llm.dtype))
    return {
        "backend": llm.backend,
        "quantization": llm.args.quantization,
        "weight_bytes": llm.stats.weight_bytes,
        "batch": batch,
        "input_len": input_len,
        "temperature": temperature,
        "top_p": top_p,
        "ttft_ms": ttft * 1e3,
        "decode_step_us": step * 1e6,
        "tokens_per_s": batch / step,
        "achieved_GBps": (llm.stats.weight_bytes + kv_bytes) / step / 1e9,
        "kv_bytes_per_step": kv_bytes,
        "prompts": prompts,
    }


def run_latency(args: argparse.Namespace) -> dict:
    """Every backend x quantization x batch x prompt length in one process, plus the copy bandwidth and
    the baselines (timed on the first case) in the same run."""
    unknown = [b for b in filter(None, args.baselines.split(",")) if b not in BASELINES]
    if unknown:
        raise MegatierError(f"unknown baseline {unknown[0]!r}: choose from {', '.join(BASELINES)}")
    rows, baselines, llm = [], {}, None
    loads = [(b, q) for b in args.backend.split(",") for q in args.quantization.split(",")]
    for backend, quantization in loads:
        del llm  # free the previous model's weights and KV cache first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        llm = LLM.from_args(EngineArgs.from_cli(args, backend=backend, quantization=quantization))
        for batch in args.batch:
            for input_len in args.input_len:
                greedy_us = None
                for temperature in args.temperature:
                    top_p = args.top_p if temperature > 0 else 1.0
                    row = measure_case(
                        llm, batch, input_len, args.output_len, args.iters, args.seed, temperature, top_p
                    )
                    prompts = row.pop("prompts")
                    if temperature == 0:
                        greedy_us = row["decode_step_us"]
                    elif greedy_us is not None:  # the same case greedy, same process: the sampler's cost
                        row["vs_greedy"] = row["decode_step_us"] / greedy_us
                    rows.append(row)
                    print_row(row, llm)
                    if args.baselines and not baselines:
                        baselines = run_baselines(llm, args.baselines.split(","), prompts, args.output_len)
    results = {"rows": rows}
    if llm.device.type == "cuda":
        bw, read_bw = copy_bandwidth(llm.device), read_bandwidth(llm.device)
        results["copy_GBps"], results["read_GBps"] = bw / 1e9, read_bw / 1e9
        for row in rows:
            moved = row["weight_bytes"] + row["kv_bytes_per_step"]
            row["pct_of_copy_bw"] = 100 * row["achieved_GBps"] * 1e9 / bw
            row["pct_of_read_bw"] = 100 * row["achieved_GBps"] * 1e9 / read_bw
            row["floor_us"] = moved / read_bw * 1e6  # bytes a step must read, at the read bandwidth
            row["floor_at_copy_bw_us"] = moved / bw * 1e6
        print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write), read bandwidth {read_bw / 1e9:.0f} GB/s")
    if baselines:
        first = rows[0]
        for name, b in baselines.items():
            b["megatier_speedup"] = b["decode_step_us"] / first["decode_step_us"]
            print(
                f"  {name:20} {b['decode_step_us']:9.1f} us  (batch {first['batch']}: megatier "
                f"{first['backend']} is {b['megatier_speedup']:.2f}x faster)"
            )
        results["baselines"] = baselines
    config = model_config(llm) | {
        "output_len": args.output_len,
        "iters": args.iters,
    }
    rec = record("latency", llm.device, config, results)
    if args.json:
        write_json(args.json, rec)
    return rec


def print_row(row: dict, llm) -> None:
    print(
        f"{llm.backend:10} {row['quantization']:4} batch {row['batch']:3} | {row['input_len']:6} in | T {row['temperature']:g} top-p "
        f"{row['top_p']:g} | decode step {row['decode_step_us']:9.1f} us"
        f" ({row['tokens_per_s']:9.1f} tok/s) | first token {row['ttft_ms']:8.2f} ms | {row['achieved_GBps']:7.1f} GB/s"
        + (f" | {row['vs_greedy']:.3f}x greedy" if "vs_greedy" in row else ""),
        flush=True,
    )


# PyTorch decode steps in one CUDA graph: eager ops, or compiled the way gpt-fast compiles its step.
TORCH_BASELINES = {"torch-eager-graph": None, "torch-compile-graph": "max-autotune-no-cudagraphs"}
BASELINES = ["hf", *TORCH_BASELINES]


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
        weights = load_safetensors_weights(llm.model_path, cfg, llm.args.quantization)
    ids = torch.tensor(prompts, device=llm.device)
    out = {}
    for name in names:
        if name == "hf":
            model = baselines.hf_model(llm.model_path, weights, llm.device, llm.dtype)
            step = baselines.hf_decode_step(model, ids, output_len)
            del model
        else:  # one of TORCH_BASELINES (run_latency checked the names)
            dec = baselines.TorchGraphDecoder(
                cfg,
                weights,
                len(prompts),
                ids.shape[1] + output_len + 1,
                llm.device,
                llm.dtype,
                compile_mode=TORCH_BASELINES[name],
            )
            dec.fill_context(ids.shape[1])
            dec.capture()
            times = cuda_time(lambda dec=dec: dec.replay(output_len), iters=5)
            step = statistics.median(times) / output_len
            del dec
        out[name] = {"decode_step_us": step * 1e6, "tokens_per_s": len(prompts) / step}
        torch.cuda.empty_cache()
    return out
