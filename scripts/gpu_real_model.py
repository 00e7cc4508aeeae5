"""Real weights on every GPU backend (issue #18 item 4): the embedded SmolLM2-135M-Instruct GGUF through
`reference` (fp32 and bf16), `graph` and `megakernel` (bf16) on one GPU, in one process.

Per backend: the chat answer to "What is the capital of France?", greedy agreement with the fp32
reference over 200 tokens for two prompts (the first divergence), and the teacher-forced NLL of the fp32
reference's continuation (prompt log-probabilities: the same tokens scored by each backend, so a wrong
weight layout shows however the greedy paths split). Then `bench latency` for SmolLM2 on megakernel and
graph at batch 1 and 8 (run separately, see the usage line).

Usage: python scripts/gpu_real_model.py --model SmolLM2.gguf --json OUT.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from megatier import LLM, SamplingParams
from megatier.bench.common import common_prefix, record, write_json

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "The history of the Roman Empire begins with",
    "def fibonacci(n):\n    ",
]
BACKENDS = [("reference", "float32"), ("reference", "bfloat16"), ("graph", "bfloat16"), ("megakernel", "bfloat16")]


def nll(llm: LLM, sequences: list[list[int]], prompt_lens: list[int]) -> float:
    """Mean negative log-likelihood of each sequence's tokens after its prompt, scored by `llm`."""
    outs = llm.generate(sequences, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    total, count = 0.0, 0
    for out, seq, start in zip(outs, sequences, prompt_lens, strict=True):
        for pos in range(start, len(seq)):
            total -= out.prompt_logprobs.logprobs[pos][seq[pos]]
            count += 1
    return total / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the SmolLM2 GGUF file")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--backends",
        default=",".join(f"{b}:{d}" for b, d in BACKENDS),
        help="backend:dtype list, the first being the reference the others are compared with",
    )
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    rows, reference = [], None
    for backend, dtype in (item.split(":") for item in args.backends.split(",")):
        llm = LLM(args.model, backend=backend, dtype=dtype, device=args.device, max_model_len=2048)
        answer = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32))[0].text
        outs = llm.generate(PROMPTS, greedy)
        tokens = [o.outputs[0].token_ids for o in outs]
        if reference is None:
            reference = {"prompt_ids": [o.prompt_token_ids for o in outs], "tokens": tokens}
        sequences = [p + t for p, t in zip(reference["prompt_ids"], reference["tokens"], strict=True)]
        row = {
            "backend": llm.backend,
            "dtype": dtype,
            "answer": answer,
            "first_divergence_vs_fp32": [common_prefix(t, r) for t, r in zip(tokens, reference["tokens"], strict=True)],
            "nll_of_fp32_continuation": nll(llm, sequences, [len(p) for p in reference["prompt_ids"]]),
            "texts": [o.text for o in outs],
        }
        rows.append(row)
        print(
            f"{row['backend']:10} {dtype:8} | answer {answer!r} | first divergence vs fp32 "
            f"{row['first_divergence_vs_fp32']} of {args.tokens} | NLL {row['nll_of_fp32_continuation']:.4f}",
            flush=True,
        )
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = rows[0]["nll_of_fp32_continuation"]
    for row in rows:
        row["nll_vs_fp32_pct"] = 100 * (row["nll_of_fp32_continuation"] / base - 1) if math.isfinite(base) else None
    config = {"model": os.path.basename(args.model), "prompts": PROMPTS, "tokens": args.tokens}
    rec = record("real_model", torch.device(args.device), config, {"rows": rows})
    write_json(args.json, rec | {"command": " ".join(["python", *sys.argv])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
