"""Which path quantized decode batches should take on the graph executor, in one process (CUDA).

For each batch size: bf16 (quantization none), then FP8 through the fused GEMVs (the default for
quantized weights up to GraphExecutor.quant_gemv_max_batch rows) and FP8 through quant_matmul (what
larger buckets use), each timed by `bench latency`'s own measure_case through the engine, with the
bytes floor at the measured copy bandwidth. `bench latency --quantization none,fp8` gives the first
two; this adds the third, which decides quant_gemv_max_batch.

    PYTHONPATH=src python scripts/gpu_quant_decode.py --model llama-3.2-1b --batch 1,8 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from megatier import LLM
from megatier.bench.common import copy_bandwidth
from megatier.bench.latency import measure_case
from megatier.loader import builtin_config_names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b", help="built-in shape (dummy weights) or model directory")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    load_format = "dummy" if args.model in builtin_config_names() else "auto"
    bw = copy_bandwidth(torch.device("cuda"))
    rows = []
    for quantization, paths in (("none", ["default"]), ("fp8", ["fused", "quant_matmul"])):
        llm = LLM(args.model, load_format=load_format, backend="graph", quantization=quantization, max_model_len=4096)
        ex = llm.engine.executor
        for path in paths:
            ex.gemv_max_batch = {"default": ex.gemv_max_batch, "fused": ex.quant_gemv_max_batch, "quant_matmul": 0}[
                path
            ]
            ex.graphs.clear()  # captured graphs bake in the path
            for batch in map(int, args.batch.split(",")):
                row = measure_case(llm, batch, args.input_len, args.output_len, args.iters, 0)
                row.pop("prompts")
                row["path"] = path
                row["floor_at_copy_bw_us"] = (row["weight_bytes"] + row["kv_bytes_per_step"]) / bw * 1e6
                rows.append(row)
                print(
                    f"{quantization:4} {path:12} batch {batch:3}: {row['decode_step_us']:8.1f} us/step "
                    f"(floor {row['floor_at_copy_bw_us']:6.1f} us at {bw / 1e9:.0f} GB/s, "
                    f"weights {row['weight_bytes'] / 1e9:.3f} GB)",
                    flush=True,
                )
        del llm, ex
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_GBps": bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
