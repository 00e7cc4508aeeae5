"""What quantized weights cost in accuracy and gain in speed, for the embedded SmolLM2-135M on the CPU.

Three loads of the same GGUF through the reference executor: `auto` (Q4_1 / Q8_0 blocks kept quantized,
multiplied by quant/cpu.py), `none` (dequantized to fp32: the old conversion cache's numbers, the
oracle) and `fp8` (the dequantized fp32 weights requantized to FP8 e4m3, one scale per output channel).
For each: the mean NLL (nats per token) of a fixed text, teacher-forced, and top-1 agreement with the
oracle on every position of it; greedy generations from a few prompts and the fraction of their tokens
matching the oracle's up to the first divergence; decode tokens/s for one sequence through the engine.
Two accuracy-only variants of FP8 from the fp32 weights follow: with the embedding / LM head in FP8 too,
and with one scale per 32 weights (simulated: rounded through FP8, multiplied in fp32).
Usage: python scripts/quant_accuracy.py [--text README.md] [--tokens 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

from megatier import LLM, SamplingParams
from megatier.bench.common import common_prefix, record, write_json
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.quant.blocks import FP8_MAX
from megatier.quant.schemes import to_fp8

SCHEMES = ("none", "auto", "fp8")  # the oracle first
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about memory bandwidth.",
    "Explain what a KV cache is in two sentences.",
    "List three prime numbers and say why they are prime.",
]


def text_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of every position of `ids`, one prefill on a fresh cache of the model's weights."""
    cfg, pages = llm.config, -(-len(ids) // 16)
    cache = KVCache.allocate(cfg, pages, page_size=16, dtype=torch.float32, device=torch.device("cpu"))
    executor = ReferenceExecutor(cfg, llm.engine.executor.w, cache=cache)
    return executor.forward(StepBatch(ids, [0], [len(ids)], [list(range(pages))], all_logits=frozenset({0})))


def decode_tokens_per_s(llm: LLM, steps: int) -> float:
    """One sequence: the time of `steps` more generated tokens, the prompt's prefill subtracted."""
    prompt = llm.tokenizer.encode("The history of computing")
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4))  # warm up
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, ignore_eos=True, max_tokens=1))
    t1 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + 1))
    t2 = time.perf_counter()
    return steps / ((t2 - t1) - (t1 - t0))


def run(args: argparse.Namespace) -> dict:
    text = Path(args.text).read_text()
    results, oracle = {}, {}
    for scheme in SCHEMES:
        llm = LLM(device="cpu", backend="reference", quantization=scheme)
        ids = llm.tokenizer.encode(text)[: args.tokens]
        logits = text_logits(llm, ids)
        nll = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))
        greedy = [
            llm.chat([{"role": "user", "content": p}], SamplingParams(temperature=0, max_tokens=args.gen_tokens))[
                0
            ].token_ids
            for p in PROMPTS
        ]
        if scheme == "none":
            oracle = {"logits": logits, "greedy": greedy}
        ref = oracle["logits"]
        matched = sum(common_prefix(a, b) for a, b in zip(greedy, oracle["greedy"], strict=True))
        results[scheme] = {
            "mean_nll": nll,
            "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
            "max_logit_error_rel": float((logits - ref).abs().max() / ref.abs().max()),
            "greedy_prefix_agreement": matched / sum(len(g) for g in oracle["greedy"]),
            "decode_tokens_per_s": decode_tokens_per_s(llm, args.decode_steps),
            "weight_bytes": llm.stats.weight_bytes,
        }
        print(scheme, {k: round(v, 6) for k, v in results[scheme].items()}, flush=True)
    # Accuracy only, from the fp32 weights: FP8 for the embedding / LM head too (what `fp8` leaves out),
    # and FP8 with one scale per 32 weights of a row instead of per row (rounded through FP8, kept fp32).
    llm = LLM(device="cpu", backend="reference", quantization="none")
    fp32 = llm.engine.executor.w
    for name, weights in (
        ("fp8_with_lm_head", fp32.map_matrices(to_fp8)),
        ("fp8_block32_simulated", fp32.map_matrices(_fp8_block32, embeddings=lambda t: t)),
    ):
        llm.engine.executor.w = weights
        logits = text_logits(llm, ids)
        results[name] = {
            "mean_nll": float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))),
            "top1_agreement": float((logits.argmax(-1) == oracle["logits"].argmax(-1)).float().mean()),
        }
        print(name, results[name], flush=True)
    for scheme in results:
        results[scheme]["nll_vs_fp32_rel"] = results[scheme]["mean_nll"] / results["none"]["mean_nll"] - 1
    config = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (embedded)",
        "backend": "reference",
        "text": args.text,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "text_tokens": len(ids),
        "prompts": PROMPTS,
        "gen_tokens": args.gen_tokens,
        "decode_steps": args.decode_steps,
    }
    out = record("quant_cpu", torch.device("cpu"), config, results)
    return out | {"command": " ".join(["python", "scripts/quant_accuracy.py", *sys.argv[1:]])}


def _fp8_block32(t: torch.Tensor) -> torch.Tensor:
    n, k = t.shape
    v = t.float().view(n, k // 32, 32)
    scale = v.abs().amax(-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((v / scale).to(torch.float8_e4m3fn).float() * scale).view(n, k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="README.md", help="the text whose NLL is measured")
    p.add_argument("--tokens", type=int, default=1024, help="its first N tokens")
    p.add_argument("--gen-tokens", type=int, default=48, help="greedy tokens per prompt")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--json", help="write the record here")
    args = p.parse_args()
    out = run(args)
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
