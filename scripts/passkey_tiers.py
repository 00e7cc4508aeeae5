"""Passkey retrieval with the real embedded model (SmolLM2-135M-Instruct), dense vs sparse tiered KV.

A five-digit pass key is hidden at several depths of a filler text; the model is asked for it at the
end. Dense tiered attention must give the same answers as the all-in-HBM engine (lossless); sparse mode
reads 1/8 of the context per layer (sinks, recent window, best-scored pages). The HBM budget is 1/8 of
the KV too, so the HBM hit rate of selected (page, layer) slices is measured on real attention (the locality
PAM relies on), with online migration on. Runs on the CPU ("HBM" is then host memory; the placement logic
is the same). Usage: python scripts/passkey_tiers.py [--contexts 2048 4096] [--locality-tokens 96]
[--kv-sparse-residency-bonus B] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from megatier import LLM, SamplingParams

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def make_prompt(llm: LLM, context: int, depth: float, key: int) -> list[int]:
    """Token ids of a ~`context`-token prompt with the key at fraction `depth` of the filler."""
    tok = llm.tokenizer
    filler = tok.encode(FILLER * 1)
    needle = tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    head = tok.encode("There is a pass key hidden in the following text. Find it and remember it.\n")
    tail = tok.encode("\nWhat is the pass key? The pass key is")
    room = context - len(head) - len(tail) - len(needle)
    body = (filler * (room // len(filler) + 1))[:room]
    cut = int(len(body) * depth)
    return head + body[:cut] + needle + body[cut:] + tail


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    base = LLM(device="cpu", max_num_batched_tokens=512, max_model_len=max(args.contexts) + 64)
    kv_token = base.config.kv_bytes_per_token(base.dtype)
    cases = [(c, d, rng.randrange(10000, 99999)) for c in args.contexts for d in args.depths]
    params = SamplingParams(temperature=0, max_tokens=8)
    results = []
    for context, depth, key in cases:
        prompt = make_prompt(base, context, depth, key)
        row = {"context": len(prompt), "depth": depth, "key": key}
        gib = len(prompt) * kv_token / 2**30
        page_gib = 16 * kv_token / 2**30
        hbm = max(gib / 8, 24 * page_gib)  # a prefill chunk (128 tokens, 8 pages) must fit beside the pins
        engines = {
            "all-hbm": base,
            "dense": LLM(
                device="cpu",
                max_num_batched_tokens=128,
                max_model_len=max(args.contexts) + 64,
                kv_hbm=hbm,
                kv_dram=gib + 0.01,
                kv_mode="dense",
            ),
            "sparse": LLM(
                device="cpu",
                max_num_batched_tokens=128,
                max_model_len=max(args.contexts) + 64,
                kv_hbm=hbm,
                kv_dram=gib + 0.01,
                kv_mode="sparse",
                kv_sparse_budget=args.kv_sparse_budget,
                kv_sparse_residency_bonus=args.kv_sparse_residency_bonus,
            ),
        }
        for name, llm in engines.items():
            t0 = time.perf_counter()
            out = llm.generate(prompt, params)[0]
            row[name] = {"text": out.text, "found": str(key) in out.text, "tokens": out.token_ids}
            row[name]["seconds"] = round(time.perf_counter() - t0, 1)
            if name != "all-hbm":
                store = llm.engine.executor.cache
                row[name]["hbm_hit_rate"] = store.stats.hit_rate
                row[name]["hbm_pages"] = store.capacity(0) / llm.config.num_layers
        bonus = engines["sparse"].engine.executor.cache.residency_bonus  # as the store resolved the default
        row["dense_equals_all_hbm"] = row["dense"]["tokens"] == row["all-hbm"]["tokens"]
        print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
        results.append(row)
    if args.locality_tokens:
        summary_locality = locality(args, kv_token)
    summary = {name: sum(r[name]["found"] for r in results) / len(results) for name in ("all-hbm", "dense", "sparse")}
    summary["dense_equals_all_hbm"] = all(r["dense_equals_all_hbm"] for r in results)
    summary["sparse_hbm_hit_rate_mean"] = sum(r["sparse"]["hbm_hit_rate"] for r in results) / len(results)
    if args.locality_tokens:
        summary["locality"] = summary_locality
    return {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, Q4_1)",
        "budget": args.kv_sparse_budget,
        "residency_bonus": bonus,
        "summary": summary,
        "cases": results,
        "torch_threads": torch.get_num_threads(),
    }


def locality(args: argparse.Namespace, kv_token: int) -> dict:
    """HBM hit rate of selected pages, step by step, over a longer sparse generation (migration settles)."""
    context = max(args.contexts)
    gib, page_gib = context * kv_token / 2**30, 16 * kv_token / 2**30
    llm = LLM(
        device="cpu",
        max_num_batched_tokens=128,
        max_model_len=context + args.locality_tokens + 64,
        kv_hbm=max(gib / 8, 24 * page_gib),
        kv_dram=gib + 0.01,
        kv_mode="sparse",
        kv_sparse_budget=args.kv_sparse_budget,
        kv_sparse_residency_bonus=args.kv_sparse_residency_bonus,
    )
    prompt = make_prompt(llm, context, 0.5, 12345)
    engine, stats = llm.engine, llm.engine.executor.cache.stats
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.locality_tokens, ignore_eos=True))
    curve = []
    while engine.has_unfinished():
        before = (stats.hbm_hits, stats.selected_slices)
        engine.step()
        selected = stats.selected_slices - before[1]
        if selected:
            curve.append((stats.hbm_hits - before[0]) / selected)
    half = curve[len(curve) // 2 :]
    return {
        "context": len(prompt),
        "decode_steps": len(curve),
        "hbm_pages": llm.engine.executor.cache.capacity(0) / llm.config.num_layers,
        "context_pages": -(-len(prompt) // 16),
        "hit_rate_all_steps": sum(curve) / len(curve),
        "hit_rate_second_half": sum(half) / len(half),
        "hit_rate_per_step": [round(h, 3) for h in curve],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--kv-sparse-budget", type=float, default=0.125)
    p.add_argument("--kv-sparse-residency-bonus", type=float, help="default: kv/locality.py's RESIDENCY_BONUS")
    p.add_argument("--locality-tokens", type=int, default=0, help="also measure the hit rate over this many tokens")
    p.add_argument("--json")
    args = p.parse_args()
    out = run(args)
    print(json.dumps(out["summary"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
