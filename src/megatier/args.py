"""EngineArgs: every model, engine and KV-cache option in one place.

`LLM`, the CLI (`generate`, `chat`, `serve`, `bench`) and the server build an engine from one of these,
so an option is named, defaulted and documented once. The CLI flags are the field names with dashes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class EngineArgs:
    # model
    model: str | Path | None = None  # HF directory, .gguf file or built-in shape; None: the embedded model
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"  # "auto" or "dummy" (seeded random weights)
    quantization: str = "auto"  # auto: as stored (GGUF blocks, FP8 kept); none: dequantized; fp8 (quant/schemes.py)
    backend: str = "auto"  # auto, reference, graph or megakernel
    seed: int = 0  # dummy weights and unseeded sampling
    # engine
    max_model_len: int | None = None  # longest context (prompt + output) in tokens
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # per step; None: 2048 on GPU, 256 on CPU
    overlap: bool = True  # schedule and queue step N + 1 while the device runs step N
    tensor_parallel_size: int = 1  # processes sharing each layer (parallel.py); > 1: reference backend on CPU only
    # KV cache
    page_size: int = 16
    kv_cache_gb: float | None = None  # None: 2 GiB on CPU, most of the free GPU memory
    kv_hbm: float | None = None  # GiB; any kv_* below (or kv_mode sparse) turns on the tiered KV cache
    kv_dram: float | None = None
    kv_disk: float | None = None
    kv_disk_dir: str | None = None
    kv_mode: str = "dense"  # dense: every page (lossless); sparse: sinks, recent window, best-scored pages
    kv_sparse_budget: float = 0.125  # sparse: fraction of the context read per step
    # sparse: logits by which selection prefers pages in HBM (None: kv/locality.py's RESIDENCY_BONUS)
    kv_sparse_residency_bonus: float | None = None

    @property
    def tiered(self) -> bool:
        return any(x is not None for x in (self.kv_hbm, self.kv_dram, self.kv_disk)) or self.kv_mode != "dense"

    @classmethod
    def from_cli(cls, args: argparse.Namespace, **overrides) -> EngineArgs:
        """The fields that `args` holds (flags a subcommand does not define keep their defaults)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if f.name in vars(args)}
        return cls(**(given | overrides))


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """The model and KV-cache flags every command that loads a model takes."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="Hugging Face model directory, .gguf file, or built-in shape name "
        "(with --load-format dummy); default: the embedded SmolLM2-135M-Instruct",
    )
    g.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda")
    g.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (auto: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: seeded random weights")
    g.add_argument(
        "--quantization",
        default="auto",
        help="auto: weights as stored (GGUF Q8_0/Q4 and FP8 checkpoints stay quantized); none: dequantize "
        "them; fp8: every projection as FP8 e4m3 with per-channel scales (bench latency: a comma list runs each)",
    )
    g.add_argument(
        "--backend",
        default="auto",
        help="auto, cpu, reference, graph or megakernel (bench latency: a comma list runs each)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for dummy weights and unseeded sampling")
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="processes that split every layer (torch.distributed); above 1 only the reference backend on "
        "the CPU (gloo) for now",
    )
    g.add_argument("--max-model-len", type=int, help="longest context (prompt + output) in tokens")
    g.add_argument("--kv-cache-gb", type=float, help="memory for the KV cache (default: 2 GiB on CPU, most of the GPU)")
    g = p.add_argument_group("tiered KV cache (any of these turns it on)")
    g.add_argument("--kv-hbm", type=float, help="GiB of KV in GPU memory (default: --kv-cache-gb's default)")
    g.add_argument("--kv-dram", type=float, help="GiB of KV in pinned host memory")
    g.add_argument("--kv-disk", type=float, help="GiB of KV on disk (needs --kv-dram)")
    g.add_argument("--kv-disk-dir", help="directory for disk KV pages (default: a temporary directory)")
    g.add_argument("--kv-mode", default="dense", choices=["dense", "sparse"], help="dense: lossless; sparse: top pages")
    g.add_argument("--kv-sparse-budget", type=float, default=0.125, help="sparse: fraction of the context read")
    g.add_argument(
        "--kv-sparse-residency-bonus",
        type=float,
        help="sparse: logits added to the selection score of pages already in HBM (0: by score alone; default: "
        "kv/locality.py's RESIDENCY_BONUS, 4)",
    )


def add_batching_cli_args(p: argparse.ArgumentParser) -> None:
    """The engine's batching flags (serve)."""
    g = p.add_argument_group("batching")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences in the running batch at most")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens per engine step; longer prompts are prefilled in chunks (default 2048 on GPU, 256 on CPU)",
    )
