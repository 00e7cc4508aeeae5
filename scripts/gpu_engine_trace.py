"""Where a decode step's time goes through the whole engine: `bench latency`'s batch-1 workload under
torch.profiler, the device's timeline split into kernels, copies and idle gaps.

    PYTHONPATH=src python3 scripts/gpu_engine_trace.py --out DIR [--backend megakernel] [--decode-kernel megakernel] [--temperature 0,0.7]

For each temperature (0: greedy; else with top-p 0.95): the engine-level step time (median of 3, as
`bench latency` measures it), then one traced generation: from the first token to the end, how long the device ran the decode kernel,
other kernels, copies and memsets, and how long it idled before the first launch, between launches and
after the last one. Writes DIR/engine_trace.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from megatier.bench.common import git_commit
from megatier.bench.latency import time_generation
from megatier.llm import LLM
from megatier.sampling import SamplingParams

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
TOP_P = 0.95  # with a temperature above 0


def traced_generation(llm: LLM, prompt: list[int], output_len: int, temperature: float) -> list[dict]:
    """One generation with the device timeline recorded; marks the first token and the end."""
    engine = llm.engine
    params = SamplingParams(temperature=temperature, top_p=TOP_P, seed=0, max_tokens=output_len, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        rid = engine.add_request(prompt, params)
        first = False
        while engine.has_unfinished():
            with record_function("engine.step"):
                updates = engine.step()
            if not first and any(u.request_id == rid and u.new_token_ids for u in updates):
                with record_function("mark.first_token"):
                    first = True
        torch.cuda.synchronize()
        with record_function("mark.end"):
            pass
    path = Path("/tmp/engine_trace.json")
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())["traceEvents"]


def split_timeline(events: list[dict], decode_kernel: str) -> dict:
    """The device's work between the first-token mark and the end mark (the parts inside it), by kind,
    and its idle gaps."""
    mark = {e["name"]: e["ts"] for e in events if e.get("name", "").startswith("mark.")}
    t0, t1 = mark["mark.first_token"], mark["mark.end"]
    gpu = sorted(
        (e for e in events if e.get("cat") in GPU_CATEGORIES and t0 <= e["ts"] + e["dur"] and e["ts"] <= t1),
        key=lambda e: e["ts"],
    )
    busy: dict[str, float] = {}
    gaps, end = [], t0
    for e in gpu:
        kind = "decode kernel" if decode_kernel in e["name"] else f"{e['cat']}: {e['name'][:60]}"
        busy[kind] = busy.get(kind, 0.0) + min(e["ts"] + e["dur"], t1) - max(e["ts"], t0)
        gaps.append((max(0.0, e["ts"] - end), kind))
        end = max(end, e["ts"] + e["dur"])
    decode = [e for e in gpu if decode_kernel in e["name"]]
    return {
        "span_us": t1 - t0,
        "busy_us": busy,
        "decode_launches": len(decode),
        "decode_kernel_us": [round(e["dur"], 1) for e in decode],
        "idle_before_first_us": gaps[0][0] if gaps else None,
        "idle_between_us": sum(g for g, _ in gaps[1:]),
        "largest_gaps_us": sorted(((round(g, 1), k) for g, k in gaps[1:]), reverse=True)[:12],
        "idle_after_last_us": t1 - end,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backend", default="megakernel")
    parser.add_argument("--decode-kernel", default="megakernel", help="a name part of the kernels that decode")
    parser.add_argument("--temperature", default="0,0.7", help="a comma list; 0: greedy, else top-p 0.95")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": {},
    }
    llm = LLM("llama-3.2-1b", device="cuda", load_format="dummy", backend=args.backend, max_model_len=4096)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, llm.config.vocab_size, (args.input_len,), generator=gen).tolist()
    for t in (float(s) for s in args.temperature.split(",")):
        top_p = TOP_P if t else 1.0
        time_generation(llm, [prompt], 8, t, top_p)
        steps = [time_generation(llm, [prompt], args.output_len, t, top_p)[1] * 1e6 for _ in range(3)]
        run = {"step_us": statistics.median(steps), "step_us_all": steps}
        run |= split_timeline(traced_generation(llm, prompt, args.output_len, t), args.decode_kernel)
        decode_steps = args.output_len - 1
        run["decode_kernel_us_per_step"] = run["busy_us"].get("decode kernel", 0.0) / decode_steps
        run["span_us_per_step"] = run["span_us"] / decode_steps
        res["runs"][f"T={t:g}"] = run
        print(json.dumps({f"T={t:g}": run}, indent=1), flush=True)
        (args.out / "engine_trace.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
