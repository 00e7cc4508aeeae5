"""`megatier bench serve`: an async load client for any OpenAI-compatible server (ours, vLLM, SGLang).

It sends streaming requests at a Poisson request rate (or all at once), optionally capped at a fixed
concurrency, and reports what `vllm bench serve` reports, defined the same way:
  TTFT  request sent -> first chunk carrying tokens
  TPOT  (E2EL - TTFT) / (output tokens - 1), one value per request
  ITL   every gap between successive chunks carrying tokens, pooled over all requests
  E2EL  request sent -> end of the stream
Token counts come from the server's usage chunk (stream_options.include_usage). The JSON record's
"device" is the client machine; the server is named by --base-url in its config.

Prompts: `random` draws lengths uniformly around --random-input-len/--random-output-len; `sharegpt`
draws them log-normally around the same medians with the long tail of ShareGPT conversations. With
--tokenizer the prompts are text of about that many tokens; without one they are token-id lists
(ids below 256, valid in any real vocabulary), which /v1/completions accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from megatier.errors import MegatierError

# ShareGPT's length spread (log-normal sigma of prompt and reply tokens), from its published histograms.
SHAREGPT_SIGMA_IN, SHAREGPT_SIGMA_OUT = 1.0, 0.8
METRICS = (("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"))
METRICS += (("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL"))


@dataclass
class Request:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class Result:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# -- workload ------------------------------------------------------------------------------------------------


def lengths(args: argparse.Namespace, rng: np.random.Generator) -> list[tuple[int, int]]:
    n, lin, lout = args.num_prompts, args.random_input_len, args.random_output_len
    if args.dataset == "random":
        r = args.random_range_ratio
        ins = rng.integers(int(lin * (1 - r)), int(lin * (1 + r)) + 1, n)
        outs = rng.integers(int(lout * (1 - r)), int(lout * (1 + r)) + 1, n)
    else:
        ins = np.clip(rng.lognormal(math.log(lin), SHAREGPT_SIGMA_IN, n), 4, 4 * lin)
        outs = np.clip(rng.lognormal(math.log(lout), SHAREGPT_SIGMA_OUT, n), 4, 4 * lout)
    return [(max(int(i), 1), max(int(o), 1)) for i, o in zip(ins, outs, strict=True)]


def make_requests(args: argparse.Namespace) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    tokenizer = None
    if args.tokenizer:
        from megatier.tokenizer import Tokenizer

        tokenizer = Tokenizer(Path(args.tokenizer))
    elif args.endpoint == "/v1/chat/completions":
        raise MegatierError("the chat endpoint takes text: pass --tokenizer DIR so prompts have a known length")
    special = set(tokenizer.hf.get_added_tokens_decoder()) if tokenizer else set()
    requests = []
    for lin, lout in lengths(args, rng):
        if tokenizer is None:
            requests.append(Request(rng.integers(0, 256, lin).tolist(), lin, lout))
            continue
        ids = [t for t in rng.integers(0, tokenizer.vocab_size, 2 * lin).tolist() if t not in special][:lin]
        text = tokenizer.decode(ids)
        requests.append(Request(text, len(tokenizer.encode(text, add_special_tokens=False)), lout))
    return requests


def payload(args: argparse.Namespace, model: str, req: Request) -> dict[str, Any]:
    body = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "/v1/chat/completions":
        return body | {"messages": [{"role": "user", "content": req.prompt}]}
    return body | {"prompt": req.prompt}


# -- the client -----------------------------------------------------------------------------------------------


def carries_tokens(chunk: dict[str, Any]) -> bool:
    """Whether a stream chunk delivers generated tokens: it has a choice, and is not the chat stream's
    opening announcement of the assistant role (the usage chunk has no choices)."""
    choices = chunk.get("choices")
    if not choices:
        return False
    delta = choices[0].get("delta")
    return delta is None or "role" not in delta or bool(delta.get("content"))


async def send(client: httpx.AsyncClient, endpoint: str, body: dict[str, Any]) -> Result:
    """One streaming request, timed chunk by chunk."""
    result, chunks = Result(), 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", endpoint, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if carries_tokens(chunk):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2el = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "the stream carried no tokens"
    return result


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise MegatierError(f"GET /v1/models answered HTTP {response.status_code}: pass --model")
    return response.json()["data"][0]["id"]


async def run_load(args: argparse.Namespace, requests: list[Request]) -> tuple[list[Result], float, str]:
    """Send every request (after one warm-up); returns (results, seconds, model name)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or len(requests), max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits) as client:
        try:
            model = args.model or await first_model(client)
        except httpx.HTTPError as e:
            raise MegatierError(f"cannot reach {args.base_url}: {e}") from None
        warmup = await send(client, args.endpoint, payload(args, model, Request(requests[0].prompt, 0, 4)))
        if not warmup.ok:
            raise MegatierError(f"the warm-up request to {args.base_url}{args.endpoint} failed: {warmup.error}")
        rng = np.random.default_rng(args.seed + 1)
        gate = asyncio.Semaphore(args.max_concurrency or len(requests))

        async def limited(req: Request) -> Result:
            async with gate:
                result = await send(client, args.endpoint, payload(args, model, req))
                result.prompt_tokens = result.prompt_tokens or req.prompt_len
                return result

        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.exponential(1 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start, model


# -- report ---------------------------------------------------------------------------------------------------


def summarize(
    results: list[Result], duration: float, percentiles: list[float]
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The figures `vllm bench serve` prints (milliseconds), and the raw samples behind them."""
    done = [r for r in results if r.ok]
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2el for r in done],
    }
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    for name, values in samples.items():
        ms = np.array(values) * 1e3 if values else np.zeros(1)
        summary[f"mean_{name}_ms"] = float(ms.mean())
        summary[f"median_{name}_ms"] = float(np.median(ms))
        summary[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            summary[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["first_error"] = errors[0]
    return summary, samples


def report(summary: dict[str, Any], args: argparse.Namespace, percentiles: list[float]) -> str:
    def row(label: str, value: Any) -> str:
        return f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}"

    lines = [f"{' Serving Benchmark Result ':=^50}"]
    lines += [
        row("Successful requests:", summary["completed"]),
        row("Failed requests:", summary["failed"]),
        row("Maximum request concurrency:", args.max_concurrency or "none"),
        row("Request rate configured (RPS):", args.request_rate),
        row("Benchmark duration (s):", summary["duration_s"]),
        row("Total input tokens:", summary["total_input_tokens"]),
        row("Total generated tokens:", summary["total_output_tokens"]),
        row("Request throughput (req/s):", summary["request_throughput"]),
        row("Output token throughput (tok/s):", summary["output_throughput"]),
        row("Total token throughput (tok/s):", summary["total_token_throughput"]),
    ]
    for key, title, short in METRICS:
        lines.append(f"{title:-^50}")
        lines.append(row(f"Mean {short} (ms):", summary[f"mean_{key}_ms"]))
        lines.append(row(f"Median {short} (ms):", summary[f"median_{key}_ms"]))
        lines += [row(f"P{p:g} {short} (ms):", summary[f"p{p:g}_{key}_ms"]) for p in percentiles]
    lines.append("=" * 50)
    if "first_error" in summary:
        lines.append(f"first error: {summary['first_error']}")
    return "\n".join(lines)


def plot(samples: dict[str, list[float]], title: str, path: str | Path) -> None:
    """Histograms of TTFT, TPOT, ITL and E2EL, with the median and p99 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, name, short) in zip(axes.flat, METRICS, strict=True):
        ms = np.array(samples[key]) * 1e3
        if ms.size:
            ax.hist(ms, bins=40, color="tab:blue", alpha=0.8)
            for q, style in ((50, "-"), (99, "--")):
                ax.axvline(
                    np.percentile(ms, q), color="black", linestyle=style, label=f"p{q} {np.percentile(ms, q):.1f}"
                )
            ax.legend()
        ax.set_title(f"{short}: {name}")
        ax.set_xlabel("ms")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    if args.num_prompts < 1 or args.random_input_len < 1 or args.random_output_len < 1:
        raise MegatierError("--num-prompts, --random-input-len and --random-output-len must be >= 1")
    if args.request_rate <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise MegatierError("--request-rate must be > 0 and --max-concurrency >= 1")
    try:
        percentiles = [float(p) for p in args.percentiles.split(",")]
    except ValueError:
        raise MegatierError(f"--percentiles {args.percentiles!r}: expected numbers like 50,90,99") from None
    requests = make_requests(args)
    results, duration, model = asyncio.run(run_load(args, requests))
    summary, samples = summarize(results, duration, percentiles)
    print(report(summary, args, percentiles))

    import torch  # only for the record's client description

    from megatier.bench.common import record, write_json

    config = {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": model,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "input_len": args.random_input_len,
        "output_len": args.random_output_len,
        "range_ratio": args.random_range_ratio,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "ignore_eos": args.ignore_eos,
        "tokenizer": args.tokenizer,
    }
    rec = record("serve", torch.device("cpu"), config, summary)
    if args.json:
        write_json(args.json, rec)
    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot_path:
        plot(samples, f"{model} via {args.endpoint}: {args.num_prompts} requests, {args.dataset}", plot_path)
    return rec
