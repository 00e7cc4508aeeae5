"""Micro-benchmarks behind the tier bandwidth split: PCIe copies, CPU attention, GPU split-KV, disk.

Each figure is bytes of KV (or copy) per second, measured on this machine in this process. Without CUDA
(`python -m megatier.bench.tier_micro`) the CPU and disk parts run and the rest is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from megatier.bench.common import cuda_time
from megatier.kv.cpu_attention import auto_isa, cpu_attention, default_threads, host_read_bandwidth, supported_isas
from megatier.kv.disk import DiskPool
from megatier.kv.host_memory import host_pool, huge_page_fraction

PAGE_SIZE = 16
# (query heads, kv heads, head_dim) of the shapes the CPU kernel is held to (issue #17).
KERNEL_SHAPES = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128)}


def _wall(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pcie(cfg, device) -> dict:
    """Pinned H2D / D2H GB/s by size, the strided per-layer fetch (one 2D DMA per run), and the gather
    kernel over scattered slices in pinned memory (both directions)."""
    n = 1 << 28
    host = torch.randint(0, 255, (n,), dtype=torch.uint8).pin_memory()
    dev = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    out = {"h2d_GBps": {}, "d2h_GBps": {}}
    for size in (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28):
        h2d = statistics.median(cuda_time(lambda s=size: dev[:s].copy_(host[:s], non_blocking=True), 10))
        d2h = statistics.median(cuda_time(lambda s=size: host[:s].copy_(dev[:s], non_blocking=True), 10))
        out["h2d_GBps"][size] = size / h2d / 1e9
        out["d2h_GBps"][size] = size / d2h / 1e9
    from cuda.bindings import runtime as cudart

    page = cfg.kv_bytes_per_token(torch.bfloat16) * PAGE_SIZE
    piece = page // cfg.num_layers
    rows = n // page
    stream = torch.cuda.current_stream(device).cuda_stream

    def strided():
        cudart.cudaMemcpy2DAsync(
            dev.data_ptr(),
            piece,
            host.data_ptr(),
            page,
            piece,
            rows,
            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            stream,
        )

    out["strided_layer_fetch_GBps"] = rows * piece / statistics.median(cuda_time(strided, 10)) / 1e9
    out["strided_slice_bytes"] = piece
    # The gather kernel the tiered store fetches and migrates with: scattered slices, zero-copy, one launch.
    from megatier.kernels.copy_slices import copy_slices

    shape = (2, cfg.num_kv_heads, PAGE_SIZE, cfg.head_dim)
    slices = n // (piece * 2)
    pinned = host[: slices * piece].view(torch.bfloat16).view(slices, 1, *shape)
    staging = torch.empty((slices, 1, *shape), dtype=torch.bfloat16, device=device)
    src = torch.randperm(slices, device=device).int()
    dst = torch.arange(slices, dtype=torch.int32, device=device)
    for name, a, b in (("gather_h2d_GBps", pinned, staging), ("gather_d2h_GBps", staging, pinned)):
        out[name] = (
            slices * piece / statistics.median(cuda_time(lambda a=a, b=b: copy_slices(a, b, src, dst), 10)) / 1e9
        )
    return out


def _pages(heads: int, kv_heads: int, d: int, nbytes: int, pinned: bool, batch: int = 16):
    """(q, pool, offsets, pages, rows, bytes read): batch sequences over about nbytes of bf16 pages in a
    random order, as a long-running cache leaves them, in memory allocated as the DRAM tier's is."""
    slice_bytes = 2 * kv_heads * PAGE_SIZE * d * 2
    num = nbytes // slice_bytes
    pool = host_pool((num, 2, kv_heads, PAGE_SIZE, d), torch.bfloat16, pinned)
    pool.view(-1).normal_()
    q = torch.randn(batch, heads, d)
    offsets = np.linspace(0, num, batch + 1).astype(np.int64)
    pages = np.random.default_rng(0).permutation(num).astype(np.int32)
    rows = np.full(num, PAGE_SIZE, dtype=np.int32)
    return q, pool, offsets, pages, rows, num * slice_bytes


@contextlib.contextmanager
def _pcie_pump(device) -> Iterator[Callable[[], float]]:
    """A pinned host-to-device copy loop on a side stream while the block runs; yields a function that
    gives the copy GB/s from the block's start to the call."""
    host = torch.empty(1 << 28, dtype=torch.uint8).pin_memory()
    dev = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    stop = threading.Event()
    copied = [0]

    def pump():
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            while not stop.is_set():
                for _ in range(8):
                    dev.copy_(host, non_blocking=True)
                stream.synchronize()
                copied[0] += 8 * host.numel()

    thread = threading.Thread(target=pump)
    thread.start()
    time.sleep(0.2)
    t0, c0 = time.perf_counter(), copied[0]
    try:
        yield lambda: (copied[0] - c0) / (time.perf_counter() - t0) / 1e9
    finally:
        stop.set()
        thread.join()


def cpu_attention_bw(cfg, device) -> dict:
    """GB/s of KV read by the CPU kernel (C and torch) by thread count, and C under a concurrent PCIe copy
    (CUDA only)."""
    d = cfg.head_dim
    q, pool, offsets, pages, rows, nbytes = _pages(
        cfg.num_heads, cfg.num_kv_heads, d, 1 << 30, pinned=device.type == "cuda"
    )
    cores = default_threads() + (1 if torch.cuda.is_available() else 0)
    out: dict = {"c_GBps": {}, "torch_GBps": {}}
    for t in sorted({1, 2, 4, 8, cores - 1, cores}):
        sec = _wall(lambda t=t: cpu_attention(q, pool, offsets, pages, rows, d**-0.5, threads=t, impl="c"))
        out["c_GBps"][t] = nbytes / sec / 1e9
    torch_threads = torch.get_num_threads()
    for t in sorted({1, 4, cores}):
        torch.set_num_threads(t)
        sec = _wall(lambda: cpu_attention(q, pool, offsets, pages, rows, d**-0.5, impl="torch"), reps=2)
        out["torch_GBps"][t] = nbytes / sec / 1e9
    torch.set_num_threads(torch_threads)
    # Contention: the DRAM share of a dense step is read by the CPU while PCIe reads another share.
    out["c_GBps_during_pcie"] = out["pcie_GBps_during_c"] = None
    if device.type == "cuda":
        with _pcie_pump(device) as pcie_rate:
            sec = _wall(lambda: cpu_attention(q, pool, offsets, pages, rows, d**-0.5, impl="c"))
            out["pcie_GBps_during_c"] = pcie_rate()
        out["c_GBps_during_pcie"] = nbytes / sec / 1e9
    out["threads_default"] = default_threads()
    return out


def _kernel_shape(device, heads: int, kv_heads: int, d: int, kv_bytes: int, threads: int) -> dict:
    cuda = device.type == "cuda"
    q, pool, offsets, pages, rows, nbytes = _pages(heads, kv_heads, d, kv_bytes, pinned=cuda)

    def run(isa: str | None = None, over: torch.Tensor = pool) -> None:
        cpu_attention(q, over, offsets, pages, rows, d**-0.5, threads=threads, impl="c", isa=isa)

    rates = {
        isa: nbytes / _wall(lambda i=isa: run(i), reps=2 if isa == "scalar" else 5) / 1e9 for isa in supported_isas()
    }
    out = {"kv_GB": nbytes / 1e9, "GBps": rates, "huge_page_fraction": huge_page_fraction(pool)}
    out |= dict.fromkeys(
        ("GBps_during_pcie", "pcie_GBps_during", "GBps_cuda_host_alloc", "huge_page_fraction_cuda_host_alloc")
    )
    if cuda:
        with _pcie_pump(device) as pcie_rate:
            sec = _wall(run)
            out["pcie_GBps_during"] = pcie_rate()
        out["GBps_during_pcie"] = nbytes / sec / 1e9
        # The same pages in torch's pinned memory (cudaHostAlloc, 4 KiB pages): what the tier used before.
        plain = torch.empty(pool.shape, dtype=pool.dtype, pin_memory=True).copy_(pool)
        out["GBps_cuda_host_alloc"] = nbytes / _wall(lambda: run(over=plain)) / 1e9
        out["huge_page_fraction_cuda_host_alloc"] = huge_page_fraction(plain)
    return out


def kernel_vs_probe(device, kv_bytes: int = 4 << 30) -> dict:
    """The C kernel's KV GB/s for each shape of KERNEL_SHAPES (kv_bytes of bf16 pages, batch 16, default
    threads) by SIMD variant, as a fraction of the host read bandwidth the same threads reach (issue #17
    asks >= 80%); and the default variant while PCIe copies run (CUDA only)."""
    threads = default_threads()
    probe = host_read_bandwidth(threads=threads) / 1e9
    out: dict = {"host_read_GBps": probe, "isa_auto": auto_isa(), "threads": threads}
    for name, (heads, kv_heads, d) in KERNEL_SHAPES.items():
        shape = _kernel_shape(device, heads, kv_heads, d, kv_bytes, threads)
        shape["of_probe"] = {isa: rate / probe for isa, rate in shape["GBps"].items()}
        out[name] = shape
    return out


def gpu_split_kv(cfg, device) -> dict:
    """GB/s of KV read by the Triton split-KV kernel over 4 GiB of pages (one layer view)."""
    from megatier.kernels.decode_attention import paged_decode_attention

    kv_heads, d = cfg.num_kv_heads, cfg.head_dim
    slice_bytes = 2 * kv_heads * PAGE_SIZE * d * 2
    num = (4 << 30) // slice_bytes
    batch = 16
    kv = torch.randn((num, 1, 2, kv_heads, PAGE_SIZE, d), dtype=torch.bfloat16, device=device)
    q = torch.randn(batch, cfg.num_heads, d, dtype=torch.bfloat16, device=device)
    per = num // batch
    tables = torch.randperm(num, device=device)[: per * batch].view(batch, per).int()
    lens = torch.full((batch,), per * PAGE_SIZE, dtype=torch.int32, device=device)
    out = {}
    for splits in (1, 4, 16):
        sec = statistics.median(cuda_time(lambda s=splits: paged_decode_attention(q, kv, 0, tables, lens, s, 0.1), 10))
        out[f"splits_{splits}_GBps"] = per * batch * slice_bytes / sec / 1e9
    return out


def disk(cfg) -> dict:
    """GB/s of whole-page writes and verified reads through the disk pool (page cache included)."""
    page = cfg.kv_bytes_per_token(torch.bfloat16) * PAGE_SIZE
    count = max(8, (256 << 20) // page)
    with tempfile.TemporaryDirectory() as tmp:
        pool = DiskPool(tmp, count, cfg.num_layers, page // cfg.num_layers)
        data = np.random.default_rng(0).integers(0, 255, page, dtype=np.uint8)
        t0 = time.perf_counter()
        for i in range(count):
            pool.write(i, data)
        write = time.perf_counter() - t0
        buf = np.empty(page, dtype=np.uint8)
        t0 = time.perf_counter()
        for i in range(count):
            pool.read(i, buf)
        read = time.perf_counter() - t0
    return {"write_GBps": count * page / write / 1e9, "read_verified_GBps": count * page / read / 1e9}


def run_micro(cfg, device) -> dict:
    out = {}
    for name, fn in (
        ("pcie", lambda: pcie(cfg, device)),
        ("cpu_attention", lambda: cpu_attention_bw(cfg, device)),
        ("cpu_kernel_vs_probe", lambda: kernel_vs_probe(device)),
        ("gpu_split_kv", lambda: gpu_split_kv(cfg, device)),
        ("disk", lambda: disk(cfg)),
    ):
        if device.type != "cuda" and name in ("pcie", "gpu_split_kv"):
            print(f"  micro {name}: skipped (no CUDA)", flush=True)
            continue
        out[name] = fn()
        print(f"  micro {name}: {out[name]}", flush=True)
        torch.cuda.empty_cache()
    return out


def main() -> None:
    from megatier.config import load_config
    from megatier.loader import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b", help="the shape of the thread-count sweep")
    args = parser.parse_args()
    run_micro(load_config(resolve_model(args.model)), torch.device("cuda" if torch.cuda.is_available() else "cpu"))


if __name__ == "__main__":
    main()
