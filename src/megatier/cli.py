"""megatier command line: generate, chat, bench."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from megatier.args import EngineArgs, add_batching_cli_args, add_cli_args
from megatier.errors import MegatierError

DESCRIPTION = """\
megatier runs LLMs locally with low latency. With no --model it uses the embedded
SmolLM2-135M-Instruct, which works offline (the first run converts it once, ~30 s).

examples:
  megatier generate "The capital of France is"
  megatier generate --chat "Write a haiku about GPUs" --temperature 0.7
  megatier chat
  megatier bench latency --model llama-3.2-1b --load-format dummy --batch 1
  megatier serve --port 8000        (then: megatier bench serve --base-url http://127.0.0.1:8000)
"""


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), higher = more random")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    c = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="JSON", help="the output must be JSON following this schema (text)")
    c.add_argument("--json-schema-file", metavar="FILE", help="the same, with the schema read from FILE")
    c.add_argument("--regex", help="the whole output must match this regular expression")
    c.add_argument("--grammar-file", metavar="FILE", help="the output must follow this Lark grammar (llguidance's)")


def structured_output(args: argparse.Namespace):
    """The constraint the structured-output flags ask for, or None."""
    from megatier.structured import StructuredOutput

    if args.json_schema is not None:
        return StructuredOutput(json_schema=args.json_schema)
    if args.regex is not None:
        return StructuredOutput(regex=args.regex)
    for path, kind in ((args.json_schema_file, "json_schema"), (args.grammar_file, "grammar")):
        if path is not None:
            try:
                return StructuredOutput(**{kind: Path(path).read_text()})
            except OSError as e:
                raise MegatierError(f"cannot read {path}: {e.strerror}") from None
    return None


def sampling_params(args: argparse.Namespace):
    from megatier.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        seed=args.seed if args.temperature > 0 else None,
        structured_output=structured_output(args),
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from megatier.llm import LLM

    llm = LLM.from_args(EngineArgs.from_cli(args))
    params = sampling_params(args)
    if args.chat:
        stream = llm.chat_stream([{"role": "user", "content": args.prompt}], params)
    else:
        sys.stdout.write(args.prompt)
        stream = llm.generate_stream(args.prompt, params)
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from megatier.llm import LLM

    llm = LLM.from_args(EngineArgs.from_cli(args))
    params = sampling_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("megatier chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for delta in llm.chat_stream(system + history, params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench_latency(args: argparse.Namespace) -> None:
    from megatier.bench.latency import run_latency

    run_latency(args)


def cmd_serve(args: argparse.Namespace) -> None:
    from megatier.serve.server import run_server

    run_server(args)


def cmd_bench_throughput(args: argparse.Namespace) -> None:
    from megatier.bench.throughput import run_throughput

    run_throughput(args)


def cmd_bench_tiers(args: argparse.Namespace) -> None:
    from megatier.bench.tiers import run_tiers

    run_tiers(args)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from megatier.bench.serve import run_bench_serve

    run_bench_serve(args)


def comma_list(parse: type, what: str):
    """An argparse type for a comma list of `parse` values ("1,8"), named `what` in its error."""

    def parse_list(text: str) -> list:
        try:
            return [parse(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse_list


int_list = comma_list(int, "integers")
float_list = comma_list(float, "numbers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatier", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what megatier is doing")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="complete a prompt, streaming the text to stdout")
    p.add_argument("prompt", help="the text to complete")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    add_cli_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template and history")
    p.add_argument("--system", help="system prompt")
    add_cli_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="measure performance").add_subparsers(
        dest="bench", required=True, metavar="BENCH"
    )
    p = bench.add_parser("latency", help="per-token decode latency of one batch of sequences")
    add_cli_args(p)
    p.add_argument(
        "--batch", type=int_list, default=[1], help="sequences decoded together; a comma list runs each (default 1)"
    )
    p.add_argument(
        "--input-len",
        type=int_list,
        default=[32],
        help="prompt tokens per sequence; a comma list runs each (default 32)",
    )
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per sequence (default 128)")
    p.add_argument("--iters", type=int, default=3, help="timed repetitions; the median is reported")
    p.add_argument(
        "--temperature",
        type=float_list,
        default=[0.0],
        help="0: greedy (default); else sampled, seeded; a comma list (0,0.7) times each in one process",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature (default 1: off)")
    p.add_argument(
        "--baselines",
        default="",
        help="also time these on the same weights (CUDA): hf,torch-eager-graph,torch-compile-graph",
    )
    p.add_argument("--json", help="write the result record to this file")
    p.set_defaults(func=cmd_bench_latency)

    p = bench.add_parser("throughput", help="decode tokens/s as the batch grows, at a fixed context")
    add_cli_args(p)
    p.add_argument(
        "--batches",
        type=int_list,
        default=[1, 8, 64, 256],
        help="comma-separated batch sizes (default 1,8,64,256)",
    )
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per sequence (default 64)")
    p.add_argument("--json", help="write the result record to this file")
    p.add_argument("--plot", help="write a PNG of latency and tokens/s against the batch size")
    p.set_defaults(func=cmd_bench_throughput)

    p = bench.add_parser("tiers", help="tiered KV decode against GPU-only, offload-and-fetch and static placement")
    add_bench_tiers_args(p)
    p.set_defaults(func=cmd_bench_tiers)

    p = bench.add_parser("serve", help="load-test an OpenAI-compatible server (ours or any other)")
    add_bench_serve_args(p)
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_cli_args(p)
    add_batching_cli_args(p)
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health, /metrics, /version)")
    g.add_argument("--served-model-name", help="the model name clients send (default: --model as given)")
    g.add_argument(
        "--max-queue-len", type=int, default=1024, help="sequences that may wait for the batch; beyond that, HTTP 503"
    )
    g.add_argument(
        "--shutdown-timeout", type=float, default=10.0, help="seconds streams get to finish on shutdown (default 10)"
    )


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default: local megatier)")
    g.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"], help="API route"
    )
    g.add_argument("--model", help="model name to send (default: the first one /v1/models lists)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (env OPENAI_API_KEY)")
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=["random", "sharegpt"], help="prompt length distribution (default random)")
    g.add_argument(
        "--dataset-path",
        help="ShareGPT-format JSON file: first human turn as the prompt, its gpt reply's length as max_tokens "
        "(needs --tokenizer)",
    )
    g.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    g.add_argument("--random-input-len", type=int, default=256, help="prompt tokens (median for sharegpt)")
    g.add_argument("--random-output-len", type=int, default=64, help="max_tokens per request (median for sharegpt)")
    g.add_argument("--random-range-ratio", type=float, default=0.0, help="random: lengths vary by +-this fraction")
    g.add_argument("--output-len", type=int, help="max_tokens of every request, whatever the dataset says")
    g.add_argument("--tokenizer", help="Hugging Face tokenizer directory, to send text prompts of known length")
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default inf)")
    g.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    g.add_argument(
        "--client-processes",
        type=int,
        help="client processes sharing the load (default: one per 8 in flight, at most half the cores)",
    )
    g.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens (peers' extra field)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top_p sent (default 1: off)")
    g.add_argument("--seed", type=int, default=0, help="seed for prompts, lengths and arrival times")
    g.add_argument(
        "--num-warmups", type=int, default=1, help="requests sent and discarded before timing starts (default 1)"
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--goodput",
        nargs="+",
        metavar="KEY:MS",
        help="SLOs in ms (keys ttft, tpot, e2el), e.g. ttft:500 tpot:50: report the requests/s meeting all",
    )
    g.add_argument("--percentiles", default="90,99", help="percentiles beside mean and median (default 90,99)")
    g.add_argument("--json", help="write the result record to this file")
    g.add_argument("--plot", help="write a PNG of the latency distributions (default: next to --json)")


def add_bench_tiers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-3.2-1b", help="built-in shape, dummy weights (default llama-3.2-1b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--context", type=int, nargs="+", default=[32768], help="context length(s) to measure")
    p.add_argument("--hbm-fraction", type=float, nargs="+", default=[0.125], help="HBM budget / total KV")
    p.add_argument(
        "--kv-sparse-budget", type=float, default=0.125, help="sparse: fraction of the context read per step"
    )
    p.add_argument(
        "--kv-sparse-residency-bonus",
        type=float,
        help="sparse: logits by which selection prefers pages in HBM (default: kv/locality.py's RESIDENCY_BONUS)",
    )
    p.add_argument(
        "--pcie-share",
        type=float,
        help="megatier-dense: this fixed share of the DRAM slices over PCIe (default: balanced each step)",
    )
    p.add_argument("--methods", nargs="+", default=None, help="subset of the methods (default: all)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per repeat (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of --steps; the median step is reported")
    p.add_argument(
        "--warmup", type=int, help="untimed steps per method (default: 4; sparse migration: until it settles)"
    )
    p.add_argument("--drift-every", type=int, default=8, help="steps between drifts of the hot pages (default 8)")
    p.add_argument("--migration-mib", type=float, help="migration budget per step in MiB (default: the store's)")
    p.add_argument("--micro", action="store_true", help="also run the micro-benchmarks (PCIe, CPU, GPU, disk)")
    p.add_argument("--check", action="store_true", help="also check tiered logits against GPU-only on a small case")
    p.add_argument("--json", help="write the result record to this file")
    p.add_argument("--plot-dir", help="write throughput plots (PNG) here")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.func(args)
    except MegatierError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
