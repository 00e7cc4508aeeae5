"""Compile every Triton kernel the graph executor launches for Hopper (sm_90), without a GPU.

The Triton interpreter that runs our kernels on CPU accepts code the real compiler rejects (a variable
whose shape differs between the branches of a runtime `if`, for one), so a kernel can pass every CPU
test and still fail to build on the GPU. This drives the executor through every architecture, dtype and
code path (prefill, chunked prefill, decode with and without splits, cuBLAS and fused GEMV decode,
greedy decode) with launches replaced by compiles for an sm_90 target, PDL on. Outputs are garbage,
only compilation is checked.

    python scripts/compile_kernels_sm90.py        (TRITON_INTERPRET must be unset; CPU only)

Relies on Triton internals (triton.runtime.driver, JITFunction.run); fails loudly if they change.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction


class Sm90Driver:
    """Just enough of a Triton driver to compile for an H100/H200 that is not there."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_instead_of_launch(compiled: set) -> None:
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.add((self.fn.__name__, kernel.hash, kernel.metadata.launch_pdl))
        return kernel

    JITFunction.run = compile_only


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        sys.exit("run without TRITON_INTERPRET=1 on a machine without CUDA")
    driver.set_active(Sm90Driver())
    compiled: set = set()
    compile_instead_of_launch(compiled)

    import megatier.executors.graph  # every kernel module, before tests/conftest sets TRITON_INTERPRET
    import megatier.kernels.page_scores  # imported by the tiered KV store, not by the executor
    import megatier.kernels.pdl
    import megatier.kernels.sample  # imported lazily by the sampler, after conftest

    megatier.kernels.pdl.use_pdl = lambda device: True
    for module in list(sys.modules.values()):  # modules that imported use_pdl by name
        if getattr(module, "use_pdl", None) is not None and module.__name__.startswith("megatier.kernels."):
            module.use_pdl = megatier.kernels.pdl.use_pdl

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import ARCH_CASES
    from megatier.executors.base import StepBatch
    from megatier.executors.graph import GraphExecutor
    from megatier.kernels import merge_attention_states
    from megatier.loader import dummy_weights
    from test_graph_executor import make_cache, mixed_script, shuffled_tables, tiny_config

    device = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        for case in sorted(ARCH_CASES):
            cfg = tiny_config(case)
            tables = shuffled_tables(24, [5, 4, 4], seed=1)
            # Decode with one split (no merge) and several; batches of several rows through cuBLAS, then
            # through the fused GEMV kernels; single rows always fused.
            for split_tokens, max_fused_batch in ((256, 1), (4, 16)):
                ex = GraphExecutor(cfg, dummy_weights(cfg, 0, dtype, device), cache=make_cache(cfg, dtype, 24, 4))
                ex.split_tokens, ex.gemv_max_batch = split_tokens, max_fused_batch
                for batch, _ in mixed_script(cfg.vocab_size, tables, lambda i: i + 1):
                    ex.forward(batch)
                ex.decode_greedy(StepBatch([1, 2, 3], [13, 6, 10], [1, 1, 1], tables), 2)
                ex.decode_greedy(StepBatch([4], [15], [1], tables[:1]), 2)
        merge_attention_states(torch.randn(1, 3, 64, dtype=dtype), torch.randn(1, 3))
    compile_sampler()
    if not all(pdl for _, _, pdl in compiled):
        sys.exit("some kernels were compiled without PDL: the use_pdl override missed a module")
    compile_slice_moves()  # launched between steps and on the copy stream, without PDL
    compile_page_scores()
    print(f"{len(compiled)} kernel variants compiled for sm_90 with triton {triton.__version__}")


def compile_slice_moves() -> None:
    """The tiered KV cache's slice copy and in-place swap kernels."""
    from megatier.kernels.copy_slices import copy_slices, swap_slices

    pool, idx = torch.zeros(3, 1, 2, 2, 4, 16, dtype=torch.bfloat16), torch.tensor([0, 2], dtype=torch.int32)
    copy_slices(pool, pool.clone(), idx, idx, kernel=True)
    swap_slices(pool, pool.clone(), idx, idx, kernel=True)


def compile_page_scores() -> None:
    """The sparse tiered step's page scorer, for bf16 and fp32 metadata and two GQA group sizes."""
    from megatier.kernels.page_scores import page_scores

    for dtype in (torch.float32, torch.bfloat16):
        for heads in (8, 6):
            meta = torch.zeros(5, 2, 2, 64, dtype=dtype)
            tables = torch.zeros(3, 4, dtype=torch.int64)
            page_scores(torch.zeros(3, heads, 64, dtype=dtype), meta, tables, torch.ones(3, dtype=torch.int64), 0.1)


def compile_sampler() -> None:
    """The fused sampler's kernels: greedy-only, sampled (every stage and penalties), two vocabularies."""
    from megatier.sampling import Sampler, SampleRow, SamplingParams

    rows = [
        SamplingParams(temperature=0, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, logit_bias={3: 1.0}),
    ]
    for vocab in (300, 128256):
        sampler = Sampler(vocab, torch.device("cpu"), fused=True)
        for batch in (rows[:1], rows):
            sample_rows = [SampleRow(i, p, i, 0, [1, 2], banned_ids=(5,)) for i, p in enumerate(batch)]
            sampler.sample(torch.randn(len(batch), vocab), sample_rows)


if __name__ == "__main__":
    main()
