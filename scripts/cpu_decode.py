"""Decode and prompt tokens/s of a GGUF model on the host: megatier's backends beside llama.cpp, in one run.

For each (backend, quantization) it times the engine's decode steps of one greedy sequence (EOS ignored)
after a prompt of --depth tokens (random ids; 1 token by default): tokens/s is one over the median of the
last --tokens steps' wall time; and a prompt of each --prompt-lens length (random ids, so no cached
prefix) with one new token: prompt tokens over that time. Medians of --runs. With --llama-bench (a built
llama.cpp `llama-bench`), it runs `llama-bench -p PROMPT_LENS -n TOKENS -d DEPTH -t THREADS` on the same
file and reports megatier's ratios to it. JSON into --out.

    python scripts/cpu_decode.py [--model file.gguf] [--depth 6000] [--llama-bench PATH] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from megatier import LLM, SamplingParams
from megatier.bench.common import record, write_json
from megatier.gguf_import import default_gguf_path


def decode_rate(llm: LLM, tokens: int, depth: int, runs: int) -> list[float]:
    ids = torch.randint(1000, 30000, (max(1, depth),), generator=torch.Generator().manual_seed(depth)).tolist()
    engine, rates = llm.engine, []
    for run in range(runs + 1):  # the first run warms up: builds, first touch of the KV pages
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
        steps = []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
        if run:
            rates.append(1 / statistics.median(steps[-tokens:]))
    return rates


def prompt_rate(llm: LLM, length: int, runs: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    rates = []
    for _ in range(runs):
        ids = torch.randint(1000, 30000, (length,), generator=gen).tolist()
        t0 = time.perf_counter()
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=1))
        rates.append(length / (time.perf_counter() - t0))
    return rates


def llama_bench(binary: str, model: str, tokens: int, prompts: list[int], depth: int, threads: int) -> dict:
    lens = ",".join(map(str, prompts))
    cmd = [binary, "-m", model, "-t", str(threads), "-p", lens, "-n", str(tokens), "-r", "3", "-o", "json"]
    cmd += ["-d", str(depth)] if depth else []
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    out = {"command": " ".join(cmd), "build": rows[0].get("build_commit")}
    for r in rows:
        out["decode" if r["n_gen"] else f"prompt_{r['n_prompt']}"] = {"tok_s": r["avg_ts"], "stddev": r["stddev_ts"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf (default: the embedded model)")
    ap.add_argument("--backends", default="cpu,reference")
    ap.add_argument("--quantization", default="auto,none")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--depth", type=int, default=0, help="context tokens before the timed decode steps")
    ap.add_argument("--prompt-lens", type=lambda v: [int(x) for x in v.split(",")], default=[128, 512])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench")
    ap.add_argument("--out", default="bench/results/cpu_decode.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    threads = len(os.sched_getaffinity(0))
    results: dict = {"megatier": {}}
    for backend in args.backends.split(","):
        for quant in args.quantization.split(","):
            llm = LLM(
                model=args.model, device="cpu", backend=backend, quantization=quant,
                max_model_len=max(2048, args.depth + args.tokens + 64),
            )  # fmt: skip
            rates = decode_rate(llm, args.tokens, args.depth, args.runs)
            row = {"decode": {"tok_s": statistics.median(rates), "runs": rates}}
            for n in args.prompt_lens:
                prompt = prompt_rate(llm, n, args.runs, seed=n)
                row[f"prompt_{n}"] = {"tok_s": statistics.median(prompt), "runs": prompt}
            results["megatier"][f"{backend}/{quant}"] = row
            print(f"{backend}/{quant}: " + ", ".join(f"{k} {v['tok_s']:.1f} tok/s" for k, v in row.items()), flush=True)
            del llm
    if args.llama_bench:
        path = str(args.model or default_gguf_path())
        base = results["llama_cpp"] = llama_bench(
            args.llama_bench, path, args.tokens, args.prompt_lens, args.depth, threads
        )
        results["ratio_to_llama_cpp"] = {
            name: {k: v["tok_s"] / base[k]["tok_s"] for k, v in row.items() if k in base}
            for name, row in results["megatier"].items()
        }
        print(f"llama.cpp: {base}; ratios {results['ratio_to_llama_cpp']}", flush=True)
    config = {
        "model": args.model or "embedded SmolLM2-135M-Instruct Q4_1 GGUF",
        "threads": threads,
        "tokens": args.tokens,
        "depth": args.depth,
    }
    rec = record("cpu_decode", torch.device("cpu"), config, results) | {"command": " ".join(["python", *sys.argv])}
    write_json(args.out, rec)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
