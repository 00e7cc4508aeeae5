"""`megatier bench serve`: an async load client for any OpenAI-compatible server (ours, vLLM, SGLang).

It sends streaming requests at a Poisson request rate (or all at once), optionally capped at a fixed
concurrency, and reports what `vllm bench serve` reports, defined the same way:
  TTFT  request sent -> first chunk carrying tokens
  TPOT  (E2EL - TTFT) / (output tokens - 1), one value per request
  ITL   every gap between successive chunks carrying tokens, pooled over all requests
  E2EL  request sent -> end of the stream
Token counts come from the server's usage chunk (stream_options.include_usage). Goodput (--goodput
ttft:500 tpot:50) is the completed requests per second that meet every SLO given, in milliseconds.

The JSON record's "device", "backend", "torch" and "commit" are the server's, as it reports them at
GET /v1/megatier/info (null for a server without that route, vLLM say; "server" holds the whole
answer); "client" describes the machine the load came from. "per_request" holds vLLM's per-request
arrays, in request order: input_lens, output_lens, ttfts, e2els (seconds), itls (seconds, one list
per request), generated_texts, errors ("" when it succeeded), and slo_met with --goodput.

Prompts: `random` draws lengths uniformly around --random-input-len/--random-output-len; `sharegpt`
draws them log-normally around the same medians with the long tail of ShareGPT conversations. With
--tokenizer the prompts are text of about that many tokens; without one they are token-id lists
(ids below 256, valid in any real vocabulary), which /v1/completions accepts. --dataset-path reads a
real ShareGPT-format JSON file instead: each conversation's first human turn is the prompt, and the
length of the gpt reply after it the request's max_tokens (--output-len fixes it instead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from megatier.errors import MegatierError

# ShareGPT's length spread (log-normal sigma of prompt and reply tokens), from its published histograms.
SHAREGPT_SIGMA_IN, SHAREGPT_SIGMA_OUT = 1.0, 0.8
# Which ShareGPT conversations are used, as vLLM filters them: at least 4 prompt and 4 reply tokens (the
# reply check is skipped under --output-len), a prompt of at most 1024, prompt + reply at most 2048.
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
SLO_METRICS = ("ttft", "tpot", "e2el")
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
    text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float:
        """Seconds per output token after the first; 0 for a one-token reply (vLLM's convention)."""
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


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
    return [(max(int(i), 1), args.output_len or max(int(o), 1)) for i, o in zip(ins, outs, strict=True)]


def load_sharegpt(path: str) -> list[tuple[str, str]]:
    """(first human turn, the gpt reply after it) of every conversation in a ShareGPT-format JSON file:
    [{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}, ...].
    Conversations without such a pair are left out; a file of another shape is an error."""
    where = f"--dataset-path {path}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MegatierError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MegatierError(f"{where}: cannot read it: {e}") from None
    except json.JSONDecodeError as e:
        raise MegatierError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise MegatierError(f"{where}: expected a JSON list of conversations, got a JSON {type(data).__name__}")
    pairs = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns
        ):
            raise MegatierError(f'{where}: entry {i} is not {{"conversations": [{{"from": ..., "value": ...}}, ...]}}')
        roles = [t["from"] for t in turns]
        if "human" in roles and "gpt" in roles[roles.index("human") :]:
            human = roles.index("human")
            pairs.append((turns[human]["value"], turns[roles.index("gpt", human)]["value"]))
    if not pairs:
        raise MegatierError(f"{where}: no conversation has a human turn followed by a gpt turn")
    return pairs


def sharegpt_requests(args: argparse.Namespace, tokenizer, rng: np.random.Generator) -> list[Request]:
    """--num-prompts conversations of the file, drawn in a seeded random order, skipping those whose
    lengths vLLM would skip (SHAREGPT_* above); tokenized only as far as needed (the file is large)."""
    pairs = load_sharegpt(args.dataset_path)
    requests = []
    for i in rng.permutation(len(pairs)).tolist():
        prompt, reply = pairs[i]
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        output_len = args.output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        too_short = prompt_len < SHAREGPT_MIN_LEN or (not args.output_len and output_len < SHAREGPT_MIN_LEN)
        if too_short or prompt_len > SHAREGPT_MAX_PROMPT or prompt_len + output_len > SHAREGPT_MAX_TOTAL:
            continue
        requests.append(Request(prompt, prompt_len, output_len))
        if len(requests) == args.num_prompts:
            return requests
    raise MegatierError(
        f"--dataset-path {args.dataset_path}: only {len(requests)} of its {len(pairs)} conversations have "
        f"{SHAREGPT_MIN_LEN}..{SHAREGPT_MAX_PROMPT} prompt tokens and at most {SHAREGPT_MAX_TOTAL} in all: "
        f"lower --num-prompts to {len(requests)} or less"
    )


def make_requests(args: argparse.Namespace) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    tokenizer = None
    if args.tokenizer:
        from megatier.tokenizer import Tokenizer

        tokenizer = Tokenizer(Path(args.tokenizer))
    elif args.dataset_path:
        raise MegatierError("--dataset-path needs --tokenizer DIR to count the prompt and reply tokens")
    elif args.endpoint == "/v1/chat/completions":
        raise MegatierError("the chat endpoint takes text: pass --tokenizer DIR so prompts have a known length")
    if args.dataset_path:
        return sharegpt_requests(args, tokenizer, rng)
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
        "top_p": args.top_p,
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


async def send(client: aiohttp.ClientSession, endpoint: str, body: dict[str, Any]) -> Result:
    """One streaming request, timed chunk by chunk."""
    result, chunks = Result(), 0
    start = last = time.perf_counter()
    try:
        async with client.post(endpoint, json=body) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                result.error = f"HTTP {response.status}: {text[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if carries_tokens(chunk):
                    choice = chunk["choices"][0]
                    result.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except aiohttp.ClientError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2el = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "the stream carried no tokens"
    return result


async def first_model(client: aiohttp.ClientSession) -> str:
    async with client.get("/v1/models") as response:
        if response.status != 200:
            raise MegatierError(f"GET /v1/models answered HTTP {response.status}: pass --model")
        return (await response.json())["data"][0]["id"]


async def server_info(client: aiohttp.ClientSession) -> dict[str, Any] | None:
    """The server's own account of its device, backend and commit (GET /v1/megatier/info, served by
    megatier); None from a server without that route."""
    async with client.get("/v1/megatier/info") as response:
        if response.status != 200:
            return None
        try:
            info = json.loads(await response.read())
        except ValueError:
            return None
    return info if isinstance(info, dict) else None


@dataclass
class LoadRun:
    results: list[Result]
    duration: float
    model: str
    server: dict[str, Any] | None
    start: float = 0.0  # time.perf_counter() when timing began (one clock for every process on Linux)
    processes: int = 1


async def run_load(
    args: argparse.Namespace, requests: list[Request], ready: Callable[[], None] = lambda: None
) -> LoadRun:
    """Send --num-warmups requests (the first prompts, at the same concurrency) and discard them, call
    `ready` (client processes wait there for each other), then time every request."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or len(requests))
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(args.base_url, headers=headers, timeout=timeout, connector=connector) as client:
        try:
            model = args.model or await first_model(client)
            server = await server_info(client)
        except aiohttp.ClientError as e:
            raise MegatierError(f"cannot reach {args.base_url}: {e}") from None
        gate = asyncio.Semaphore(args.max_concurrency or len(requests))

        async def limited(req: Request) -> Result:
            async with gate:
                result = await send(client, args.endpoint, payload(args, model, req))
                result.prompt_tokens = result.prompt_tokens or req.prompt_len
                return result

        warmups = [requests[i % len(requests)] for i in range(args.num_warmups)]
        failed = next((r for r in await asyncio.gather(*map(limited, warmups)) if not r.ok), None)
        if failed:
            raise MegatierError(f"a warm-up request to {args.base_url}{args.endpoint} failed: {failed.error}")
        ready()
        rng = np.random.default_rng(args.seed + 1)
        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.exponential(1 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return LoadRun(results, time.perf_counter() - start, model, server, start)


def default_client_processes(concurrency: int | None) -> int:
    """One process per 8 requests in flight, on at most half the cores (the server has the rest)."""
    return max(1, min(-(-(concurrency or 64) // 8), (os.cpu_count() or 1) // 2))


def run_clients(args: argparse.Namespace, requests: list[Request]) -> LoadRun:
    """The load from --client-processes processes, each with its share of the requests (round robin),
    of the concurrency, the request rate and the warm-ups: one Python client parses only so many stream
    chunks a second (about 10K on one core with aiohttp), below what a GPU server streams at
    concurrency 64. They start timing together; the run lasts from the first start to the last end."""
    workers = default_client_processes(args.max_concurrency) if args.client_processes is None else args.client_processes
    workers = min(workers, len(requests), args.max_concurrency or len(requests))
    if workers <= 1:
        return asyncio.run(run_load(args, requests))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = []
    for w in range(workers):
        share = argparse.Namespace(**vars(args))
        if args.max_concurrency:
            share.max_concurrency = args.max_concurrency // workers + (w < args.max_concurrency % workers)
        share.request_rate = args.request_rate / workers
        share.num_warmups = args.num_warmups // workers + (w < args.num_warmups % workers)
        share.seed = args.seed + w
        procs.append(ctx.Process(target=_client, args=(share, requests[w::workers], barrier, results, w)))
        procs[-1].start()
    runs: dict[int, LoadRun | BaseException | None] = dict(results.get() for _ in procs)
    for proc in procs:
        proc.join()
    failed = next((r for r in runs.values() if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    merged: list[Result] = [None] * len(requests)  # type: ignore[list-item]
    for w, run in runs.items():
        merged[w::workers] = run.results
    start = min(r.start for r in runs.values())
    end = max(r.start + r.duration for r in runs.values())
    return LoadRun(merged, end - start, runs[0].model, runs[0].server, start, workers)


def _client(args: argparse.Namespace, requests: list[Request], barrier, results, index: int) -> None:
    """One client process: its LoadRun, or the error that stopped it (the parent raises it), or None when
    it stopped because another one failed."""
    try:
        run: LoadRun | BaseException | None = asyncio.run(run_load(args, requests, lambda: barrier.wait(timeout=600)))
    except threading.BrokenBarrierError:
        run = None
    except BaseException as e:  # the others stop waiting at the barrier
        barrier.abort()
        run = e if isinstance(e, MegatierError) else MegatierError(f"a client process failed: {type(e).__name__}: {e}")
    results.put((index, run))


# -- report ---------------------------------------------------------------------------------------------------


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """--goodput's KEY:MS pairs as {metric: seconds}."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        key, _, value = spec.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if key not in SLO_METRICS or not 0 < ms < math.inf:
            raise MegatierError(
                f"--goodput {spec!r}: expected KEY:MS with KEY one of {', '.join(SLO_METRICS)} and MS a "
                "positive number of milliseconds, e.g. --goodput ttft:500 tpot:50"
            )
        if key in slos:
            raise MegatierError(f"--goodput names {key} twice")
        slos[key] = ms / 1e3
    return slos


def meets_slos(result: Result, slos: dict[str, float]) -> bool:
    """Whether a request succeeded within every SLO (seconds): TTFT, TPOT and E2EL each at most its limit."""
    measured = {"ttft": result.ttft, "tpot": result.tpot, "e2el": result.e2el}
    return result.ok and all(measured[key] <= limit for key, limit in slos.items())


def summarize(
    results: list[Result], duration: float, percentiles: list[float], slos: dict[str, float] | None = None
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The figures `vllm bench serve` prints (milliseconds), and the raw samples behind them. With SLOs,
    also the goodput: requests/s meeting all of them, and their share of every request sent."""
    done = [r for r in results if r.ok]
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.output_tokens > 1],
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
    if slos:
        good = sum(meets_slos(r, slos) for r in results)
        summary["request_goodput"] = good / duration
        summary["goodput_fraction"] = good / len(results)
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


def per_request(results: list[Result], slos: dict[str, float]) -> dict[str, list]:
    """vLLM's per-request arrays (seconds), in request order, failed requests included."""
    arrays: dict[str, list] = {
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "e2els": [r.e2el for r in results],
        "itls": [r.itl for r in results],
        "generated_texts": [r.text for r in results],
        "errors": [r.error for r in results],
    }
    if slos:
        arrays["slo_met"] = [meets_slos(r, slos) for r in results]
    return arrays


def describe_server(server: dict[str, Any] | None) -> str:
    if server is None:
        return "server: no GET /v1/megatier/info (not megatier): its device, backend and commit are not recorded"
    return f"server: {server.get('device')}, backend {server.get('backend')}, commit {server.get('commit')}"


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
    if "request_goodput" in summary:
        lines.append(row("Request goodput (req/s):", summary["request_goodput"]))
        lines.append(row("Requests meeting every SLO (%):", 100 * summary["goodput_fraction"]))
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
    if args.num_warmups < 0 or (args.output_len is not None and args.output_len < 1):
        raise MegatierError("--num-warmups must be >= 0 and --output-len >= 1")
    if args.client_processes is not None and args.client_processes < 1:
        raise MegatierError("--client-processes must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise MegatierError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.dataset_path and args.dataset == "random":
        raise MegatierError("--dataset-path reads ShareGPT conversations: drop --dataset random")
    args.dataset = "sharegpt" if args.dataset_path else args.dataset or "random"
    try:
        percentiles = [float(p) for p in args.percentiles.split(",")]
    except ValueError:
        raise MegatierError(f"--percentiles {args.percentiles!r}: expected numbers like 50,90,99") from None
    slos = parse_goodput(args.goodput)
    requests = make_requests(args)
    run = run_clients(args, requests)
    summary, samples = summarize(run.results, run.duration, percentiles, slos)
    print(describe_server(run.server))
    print(report(summary, args, percentiles))

    import torch  # only for the record's client description

    from megatier.bench.common import record, write_json

    synthetic = not args.dataset_path
    config = {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": run.model,
        "dataset": args.dataset,
        "dataset_path": args.dataset_path,
        "num_prompts": args.num_prompts,
        "num_warmups": args.num_warmups,
        "input_len": args.random_input_len if synthetic else None,
        "output_len": args.output_len or (args.random_output_len if synthetic else None),
        "range_ratio": args.random_range_ratio if args.dataset == "random" else None,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "client_processes": run.processes,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "ignore_eos": args.ignore_eos,
        "tokenizer": args.tokenizer,
        "goodput_slo_ms": {key: limit * 1e3 for key, limit in slos.items()} or None,
    }
    rec = record("serve", torch.device("cpu"), config, summary)
    client = {key: rec[key] for key in ("device", "torch", "commit")}
    server = run.server or {}
    rec |= {key: server.get(key) for key in ("device", "torch", "commit")}
    rec |= {"backend": server.get("backend"), "server": run.server, "client": client}
    rec["per_request"] = per_request(run.results, slos)
    if args.json:
        write_json(args.json, rec)
    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot_path:
        plot(samples, f"{run.model} via {args.endpoint}: {args.num_prompts} requests, {args.dataset}", plot_path)
    return rec
