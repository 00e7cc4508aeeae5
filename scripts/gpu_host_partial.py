"""Why the DRAM tier's CPU attention is slower inside the captured decode step than alone (issue #17).

One self-contained, time-boxed run over a Llama-3.2-1B-shaped DRAM tier (16 layers, 8 kv heads, head_dim
64, bf16, pages of 16 tokens, batch 16, --context tokens per sequence in DRAM, slices scattered over the
pool as the tiered store leaves them). Every case runs the same 16 per-layer jobs and reports per-layer
host wall time, GB/s of KV read and the pool's wake-up time, so the causes separate:

- memory (--memory, in order): "pool", the DRAM tier's allocator (host_pool: huge pages registered with
  CUDA); "pinned", `torch.empty(pin_memory=True)` (cudaHostAlloc's 4 KiB pages, the tier's allocator
  before); "thp", host_pool's huge pages unregistered; "pageable", torch's plain allocation; each with
  its page sizes and huge-page share, and the host read probe over it;
- caller: the C kernel from Python, then on a native thread Python never saw (CPU only too), then as a
  host function launched eagerly on a stream (HostPartial, GPU work between layers), then the same
  captured in a CUDA graph and replayed (the decode step's situation);
- threading: legacy (the caller sleeps, the pool spins 50 us), join (the caller works, 50 us) and new
  (join + the pool spins 1 ms between layers);
- surroundings in the graph: the main thread spinning in torch.cuda.synchronize (as the bench does) or
  asleep, a PCIe copy running meanwhile (dense mode's PCIe share), torch CPU ops on the main thread
  meanwhile (their OpenMP team spins after each), and the same with torch on one thread;
- who runs the host function: CUDA's callback thread's affinity, CPU, policy and nice.

Without CUDA it runs the probe and the Python / native-thread cases over unpinned memory. --cases keeps
only the cases whose name holds one of its comma-separated parts. JSON to
$OUT/gpu_host_partial.json (default bench/results/), commit from $MEGATIER_COMMIT.

    python scripts/gpu_host_partial.py [--context 16384] [--budget-s 110] [--memory pool,pinned] [--cases python/new,graph/new]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from megatier.bench.common import record, write_json
from megatier.bench.tier_micro import _pcie_pump
from megatier.config import ModelConfig
from megatier.kv import cpu_attention as ca
from megatier.kv.host_memory import host_pool, huge_page_fraction
from megatier.kv.host_partial import LAYER_SPIN_US, HostPartial, launch_host_func

LAYERS, HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 32, 8, 64, 16
CFG = ModelConfig("llama", 128256, 2048, 8192, LAYERS, HEADS, KV_HEADS, HEAD_DIM)
SLICE_BYTES = 2 * KV_HEADS * PAGE * HEAD_DIM * 2
SCALE = HEAD_DIM**-0.5
# name: (caller_works, spin_us)
THREADING = {"legacy": (False, 0.0), "join": (True, 0.0), "new": (True, LAYER_SPIN_US)}
MEMORY = ("pool", "pinned", "thp", "pageable")


class Clock:
    """The run's time box: cases past the budget are recorded as skipped."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)


# -- memory --------------------------------------------------------------------------------------------


def mapping_of(ptr: int) -> dict:
    """The /proc/self/smaps entry holding ptr: its page sizes and how much of it is huge pages."""
    out: dict = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= ptr < hi
            if inside:
                out = {"path": head[5] if len(head) > 5 else "", "size_kB": (hi - lo) >> 10}
        elif inside and head[0] in ("KernelPageSize:", "MMUPageSize:", "AnonHugePages:", "Rss:"):
            out[head[0][:-1] + "_kB"] = int(head[1])
    return out


def fill(pool: torch.Tensor, gen: torch.Generator) -> None:
    """Random bf16 in every byte (a 64 MiB random block tiled): every page touched and real."""
    flat = pool.view(-1)
    block = torch.randn(32 << 20, generator=gen).to(torch.bfloat16)
    whole = flat.numel() // block.numel() * block.numel()
    flat[:whole].view(-1, block.numel()).copy_(block)
    flat[whole:].copy_(block[: flat.numel() - whole])


def allocate(kind: str, slots: int, gen: torch.Generator) -> torch.Tensor:
    """A DRAM slice pool [slots, 1, 2, kv_heads, page, head_dim] bf16 of one memory kind (MEMORY), filled."""
    shape = (slots, 1, 2, KV_HEADS, PAGE, HEAD_DIM)
    if kind == "pageable":
        pool = torch.empty(shape, dtype=torch.bfloat16)
    elif kind == "pinned":  # cudaHostAlloc: the tier's allocator before host_pool
        pool = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
    else:  # host_pool's huge pages, registered with CUDA ("pool": the tier's allocator) or not ("thp")
        pool = host_pool(shape, torch.bfloat16, pinned=kind == "pool")
    fill(pool, gen)
    return pool


# -- the work ------------------------------------------------------------------------------------------


def layer_lists(slots: int, batch: int, pages: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (offsets, slots): batch sequences of `pages` slices each, every slice in a random slot."""
    perm = rng.permutation(slots).astype(np.int32)
    offsets = (np.arange(batch + 1) * pages).astype(np.int64)
    n = batch * pages
    return [(offsets, perm[layer * n : (layer + 1) * n]) for layer in range(LAYERS)]


def summarize(steps: list[list[tuple[float, float]]], step_s: list[float], layer_bytes: int) -> dict:
    """Medians over steps of per-layer host time, GB/s and wake time; the step's host time and busy share."""
    per_layer = list(zip(*steps, strict=True))  # [layer][step] (seconds, wake)
    layer_ms = [1e3 * statistics.median(s for s, _ in runs) for runs in per_layer]
    host_s = statistics.median(sum(s for s, _ in step) for step in steps)
    out = {
        "host_ms_per_step": round(1e3 * host_s, 2),
        "GBps": round(LAYERS * layer_bytes / host_s / 1e9, 1),
        "layer_ms": [round(x, 3) for x in layer_ms],
        "layer_GBps": [round(layer_bytes / x / 1e6, 1) for x in layer_ms],
        "wake_us": [round(1e6 * statistics.median(w for _, w in runs), 1) for runs in per_layer],
        "steps": len(steps),
    }
    if step_s:
        wall = statistics.median(step_s)
        out |= {"step_ms": round(1e3 * wall, 2), "busy": round(host_s / wall, 3)}
    return out


def run_jobs(pool, lists, batch, threads, threading_name, steps, native: bool) -> dict:
    """The per-layer jobs from Python (run_job) or each on a new native thread (as CUDA would)."""
    caller_works, spin_us = THREADING[threading_name]
    q = torch.randn(batch, HEADS, HEAD_DIM)
    out, lse = torch.empty(q.shape), torch.empty(q.shape[:2])
    rows = np.full(len(lists[0][1]), PAGE, dtype=np.int32)
    jobs = [
        ca.make_job(q, pool[:, 0], o, s, rows, SCALE, out, lse, threads=threads, caller_works=caller_works, spin_us=spin_us)
        for o, s in lists
    ]  # fmt: skip
    fn = ca.host_fn()
    samples, walls = [], []
    for i in range(steps + 1):
        for job in jobs:
            job.elapsed_ns = job.wake_ns = 0
        t0 = time.perf_counter()
        for job in jobs:
            if native:
                ca.call_on_native_thread(fn, ctypes.addressof(job))
            else:
                ca.run_job(job)
        if i:  # the first step warms up
            walls.append(time.perf_counter() - t0)
            samples.append([(job.elapsed_ns / 1e9, job.wake_ns / 1e9) for job in jobs])
    assert all(job.status == 0 for job in jobs)
    return summarize(samples, walls, len(lists[0][1]) * SLICE_BYTES)


class Step:
    """A decode step's shape on the GPU: per layer a GEMV pair (about a 1B layer's weight reads), then q
    for the host partial, which the next layer waits for through the merge."""

    def __init__(self, host: HostPartial, batch: int, device: torch.device, gen: torch.Generator):
        self.host = host
        self.w1 = torch.randn(2048, 16384, generator=gen).to(device, torch.bfloat16) * 2e-3
        self.w2 = torch.randn(16384, 2048, generator=gen).to(device, torch.bfloat16) * 2e-3
        self.x = torch.randn(batch, 2048, generator=gen).to(device, torch.bfloat16)

    def __call__(self) -> torch.Tensor:
        x = self.x
        for layer in range(LAYERS):
            x = x + (x @ self.w1) @ self.w2
            q = x.view(x.shape[0], HEADS, HEAD_DIM)
            handle = self.host.start(layer, q)
            out, _ = self.host.finish(handle)
            x = x + out.view(x.shape).to(x.dtype)
        return x


def wait_idle(device: torch.device) -> None:
    """Wait for the device without spinning a core (the main thread asleep between polls)."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    while not event.query():
        time.sleep(2e-4)


def torch_cpu_ops(a: torch.Tensor, b: torch.Tensor) -> None:
    """Host work of the kind a step's planning does (parallel torch copies), while the graph runs."""
    for _ in range(8):
        a.copy_(b)


def run_gpu(pool, lists, batch, threading_name, steps, device, gen, mode: str, surroundings: str = "sync") -> dict:
    """The jobs as HostPartial's host functions: eagerly on a stream, or captured in a CUDA graph and
    replayed, with the main thread's surroundings as named."""
    host = HostPartial(pool, CFG, SCALE, device, None)
    host.caller_works, host.spin_us = THREADING[threading_name]
    host.set_lists(lists, batch)
    step = Step(host, batch, device, gen)
    side = torch.cuda.Stream(device)  # warm-up (Triton compiles, cuBLAS plans) off the capture's stream
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.synchronize(device)
    run: Callable[[], object] = step
    if mode == "graph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    a, b = torch.empty(8 << 20), torch.randn(8 << 20)
    threads_before = torch.get_num_threads()
    if surroundings == "torch_cpu_1thread":
        torch.set_num_threads(1)
    samples, walls, pcie = [], [], None
    with contextlib.ExitStack() as stack:
        rate = stack.enter_context(_pcie_pump(device)) if surroundings == "pcie" else None
        stack.callback(torch.set_num_threads, threads_before)
        for i in range(steps + 1):
            host.set_lists(lists, batch)  # waits for the previous step; zeroes the per-layer times
            t0 = time.perf_counter()
            run()
            if surroundings.startswith("torch_cpu"):
                torch_cpu_ops(a, b)
            if surroundings == "idle":
                wait_idle(device)
            else:
                torch.cuda.synchronize(device)
            if i:
                walls.append(time.perf_counter() - t0)
                samples.append(host.layer_times())
        pcie = rate() if rate else None
    out = summarize(samples, walls, len(lists[0][1]) * SLICE_BYTES)
    return out | ({"pcie_GBps_meanwhile": round(pcie, 1)} if pcie is not None else {})


def callback_thread(device: torch.device) -> dict:
    """Who runs a host function: CUDA's callback thread, asked by thread_info on a stream."""
    info = ca.ThreadInfo()
    stream = torch.cuda.Stream(device)
    launch_host_func(stream.cuda_stream, ca.thread_info_fn(), ctypes.addressof(info))
    stream.synchronize()
    main = ca.ThreadInfo()
    ca.load_library().thread_info(ctypes.byref(main))
    fields = ("mask_cpus", "cpu", "policy", "nice", "tid")
    return {"callback": {f: getattr(info, f) for f in fields}, "main": {f: getattr(main, f) for f in fields}}


def cases_for(kind: str, pool, lists, args, threads: int, device: torch.device, gen) -> list:
    """(name, run) of every case over one memory kind: from Python and on a native thread (old and new
    threading); on CUDA eager and graph host functions (every threading on the tier's own pinned memory,
    old and new in a graph elsewhere) and, on pinned memory, the graph in each surrounding."""
    batch, steps = args.batch, args.steps
    out = []
    for name in ("legacy", "new"):
        for where, native in (("python", False), ("native", True)):
            out.append(
                (f"{kind}/{where}/{name}", lambda n=name, v=native: run_jobs(pool, lists, batch, threads, n, steps, v))
            )
    if device.type != "cuda":
        return out
    for name in THREADING:
        for mode in ("eager", "graph"):
            if kind in ("pinned", "pool") or (mode == "graph" and name != "join"):
                out.append(
                    (
                        f"{kind}/{mode}/{name}",
                        lambda n=name, m=mode: run_gpu(pool, lists, batch, n, steps, device, gen, m),
                    )
                )
    if kind in ("pinned", "pool"):
        for where in ("idle", "pcie", "torch_cpu", "torch_cpu_1thread"):
            for name in ("legacy", "new"):
                out.append(
                    (
                        f"{kind}/graph/{name}/{where}",
                        lambda n=name, w=where: run_gpu(pool, lists, batch, n, steps, device, gen, "graph", w),
                    )
                )
    return out


# -- the run -------------------------------------------------------------------------------------------


def environment() -> dict:
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    return {
        "cpus_in_mask": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "pool_cpus": ca.pool_cpus(),
        "threads_default": ca.default_threads(),
        "isa": ca.auto_isa(),
        "torch_threads": torch.get_num_threads(),
        "thp_enabled": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_defrag": read("/sys/kernel/mm/transparent_hugepage/defrag"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "smt_active": read("/sys/devices/system/cpu/smt/active"),
        "cpu_model": next(
            (ln.split(":", 1)[1].strip() for ln in (read("/proc/cpuinfo") or "").splitlines() if "model name" in ln),
            None,
        ),
    }


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=16384 if cuda else 1024, help="DRAM tokens per sequence")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up)")
    ap.add_argument("--budget-s", type=float, default=100.0, help="cases past this are skipped")
    ap.add_argument("--memory", type=lambda v: v.split(","), default=list(MEMORY), help=f"kinds, in order: {MEMORY}")
    ap.add_argument(
        "--cases", type=lambda v: v.split(","), default=[], help="run only cases whose name has one of these"
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    if unknown := set(args.memory) - set(MEMORY):
        ap.error(f"unknown --memory kind(s) {sorted(unknown)}; choose from {MEMORY}")
    clock = Clock(args.budget_s)
    device = torch.device("cuda" if cuda else "cpu")
    if ca.load_library() is None:
        sys.exit("the C CPU attention kernel cannot be built here (no C compiler)")
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    pages = -(-args.context // PAGE)
    slots = LAYERS * args.batch * pages
    lists = layer_lists(slots, args.batch, pages, rng)
    threads = ca.default_threads()
    results: dict = {"env": environment(), "memory": {}, "probe_GBps": {}, "cases": {}, "skipped": []}
    if cuda:
        results["env"]["host_function_thread"] = callback_thread(device)
    print(f"env: {results['env']}", flush=True)

    def case(name: str, fn: Callable[[], dict], need_s: float) -> None:
        if clock.left() < need_s:
            results["skipped"].append(name)
            print(f"  {name}: skipped ({clock.left():.0f} s left)", flush=True)
            return
        try:
            results["cases"][name] = fn()
        except Exception as err:  # one failing case must not lose the others' numbers
            results["cases"][name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"  {name}: {results['cases'][name]}", flush=True)

    # A step's host time at ~40 GB/s, with margin for its warm-up step and a capture.
    need = (args.steps + 2) * LAYERS * args.batch * pages * SLICE_BYTES / 40e9 + 1.0
    for kind in args.memory if cuda else [k for k in args.memory if k in ("thp", "pageable")]:
        if clock.left() < need * 4 + 10:
            results["skipped"].append(f"memory {kind}")
            continue
        t0 = time.perf_counter()
        pool = allocate(kind, slots, gen)
        facts = mapping_of(pool.data_ptr()) | {
            "alloc_fill_s": round(time.perf_counter() - t0, 2),
            "GB": slots * SLICE_BYTES / 1e9,
            "huge_page_fraction": huge_page_fraction(pool),
        }
        results["memory"][kind] = facts
        probe = ca.load_library().read_bandwidth(pool.data_ptr(), slots * SLICE_BYTES, threads, 3)
        results["probe_GBps"][kind] = round(probe / 1e9, 1)
        print(f"memory {kind}: {facts}, probe {results['probe_GBps'][kind]} GB/s", flush=True)
        for name, fn in cases_for(kind, pool, lists, args, threads, device, gen):
            if not args.cases or any(c in name for c in args.cases):
                case(name, fn, need)
        del pool
    results["summary"] = {
        name: {k: c[k] for k in ("GBps", "step_ms", "busy") if k in c}
        for name, c in results["cases"].items()
        if "GBps" in c
    }
    config = {
        "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page": PAGE, "batch": args.batch,
        "context": args.context, "steps": args.steps, "threads": threads, "threading": THREADING,
        "kv_GB_per_step": LAYERS * args.batch * pages * SLICE_BYTES / 1e9, "wall_s": round(clock.budget - clock.left(), 1),
    }  # fmt: skip
    rec = record("gpu_host_partial", device, config, results) | {"command": " ".join(["python", *sys.argv])}
    path = Path(args.out) / "gpu_host_partial.json"
    write_json(path, rec)
    print(f"wrote {path} after {config['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
