"""Compare builds of the DRAM tier's CPU attention kernel on this host (issue #17), each beside the host
read probe over the same memory: kernel versions, SIMD variants, memory kinds and thread counts in one run,
so their ratios hold whatever the host's state (device hosts vary run to run by 2x).

Each --sources entry NAME=PATH is compiled as the product compiles cpu_attention.c (megatier.cbuild) and
loaded beside the others; the same Llama-3.2-1B-shaped decode jobs run through each (batch 16, 8 kv
heads, G 4, head_dim 64, bf16, pages of 16, --context tokens a sequence, one layer's slices per job, every
slice in a random slot of a pool far larger than the L3), over each --memory kind (as
scripts/gpu_host_partial.py allocates them: "thp" and "pool" are huge pages unpinned / registered with
CUDA, "pinned" cudaHostAlloc's 4 KiB pages, "pageable" torch's). Reported: KV GB/s at the pool's thread
count and at one thread, and the probe's GB/s over the same pool.

    python scripts/cpu_attention_sweep.py [--context 8192] [--memory thp,pool,pinned] [--sources old=old.c]

The package's own cpu_attention.c is always the first source ("current"). JSON to
$OUT/cpu_attention_sweep.json (default bench/results/), commit from $MEGATIER_COMMIT.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_host_partial import HEAD_DIM, HEADS, KV_HEADS, LAYERS, MEMORY, PAGE, SCALE, SLICE_BYTES, allocate, layer_lists

from megatier import cbuild
from megatier.bench.common import record, write_json
from megatier.kv import cpu_attention as ca
from megatier.kv.host_memory import huge_page_fraction


def build(name: str, source: Path) -> ctypes.CDLL:
    lib, err = cbuild.build(f"cpu_attention_{name}", source, cbuild.FLAGS)
    if lib is None:
        raise SystemExit(f"building {name} ({source}): {err}")
    lib.attend_job.argtypes = [ctypes.c_void_p]
    lib.attend_job.restype = None
    return lib


def time_jobs(lib: ctypes.CDLL, jobs: list[ca.AttendJob], reps: int) -> float:
    """Seconds of the median pass over all jobs (after one untimed pass)."""
    passes = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        for job in jobs:
            lib.attend_job(ctypes.addressof(job))
        if i:
            passes.append(time.perf_counter() - t0)
    if any(job.status for job in jobs):
        raise RuntimeError(f"a job failed with status {[job.status for job in jobs]}")
    return statistics.median(passes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=8192, help="tokens a sequence (per layer's job)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--memory", type=lambda v: v.split(","), default=["thp", "pool", "pinned"])
    ap.add_argument("--sources", type=lambda v: v.split(","), default=[], help="NAME=PATH builds to compare")
    ap.add_argument("--isas", type=lambda v: v.split(","), default=ca.supported_isas(), help="at every source")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if unknown := set(args.memory) - set(MEMORY):
        ap.error(f"unknown --memory kind(s) {sorted(unknown)}; choose from {MEMORY}")
    kinds = [k for k in args.memory if cuda or k in ("thp", "pageable")]  # the others need CUDA
    t_start = time.perf_counter()
    sources = {"current": ca.SOURCE} | dict((e.split("=", 1)[0], Path(e.split("=", 1)[1])) for e in args.sources)
    with ThreadPoolExecutor(8) as ex:  # the builds are independent compiler runs
        libs = dict(zip(sources, ex.map(build, sources, sources.values()), strict=True))
    build_s = time.perf_counter() - t_start
    threads = ca.default_threads()
    pages = -(-args.context // PAGE)
    slots = LAYERS * args.batch * pages
    lists = layer_lists(slots, args.batch, pages, np.random.default_rng(0))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, HEADS, HEAD_DIM, generator=gen)
    out, lse = torch.empty(q.shape), torch.empty(q.shape[:2])
    rows = np.full(len(lists[0][1]), PAGE, dtype=np.int32)
    layer_bytes = len(rows) * SLICE_BYTES
    results: dict = {"build_s": round(build_s, 1), "threads": threads, "memory": {}, "GBps": {}}
    isas = ["auto"] + [isa for isa in args.isas if isa not in ("scalar", ca.auto_isa())]
    cases = [(src, isa, n) for n in (threads, 1) for isa in isas for src in libs]
    for kind in kinds:
        pool = allocate(kind, slots, gen)
        probe = ca.load_library().read_bandwidth(pool.data_ptr(), slots * SLICE_BYTES, threads, 3) / 1e9
        results["memory"][kind] = {"probe_GBps": round(probe, 1), "huge_page_fraction": huge_page_fraction(pool)}
        print(f"memory {kind}: {results['memory'][kind]}", flush=True)
        for variant, isa, n in cases:
            layers = LAYERS if n > 1 else 2  # one thread: two layers' jobs are enough to time
            jobs = [
                ca.make_job(q, pool[:, 0], o, s, rows, SCALE, out, lse, threads=n, isa=None if isa == "auto" else isa)
                for o, s in lists[:layers]
            ]
            secs = time_jobs(libs[variant], jobs, args.reps)
            gbps = layers * layer_bytes / secs / 1e9
            name = f"{kind}/{variant}/{isa}/t{n}"
            results["GBps"][name] = round(gbps, 1)
            print(f"  {name}: {gbps:.1f} GB/s ({gbps / probe:.0%} of the probe)", flush=True)
        del pool
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    config = {"batch": args.batch, "context": args.context, "layers": LAYERS, "kv_heads": KV_HEADS, "group": HEADS // KV_HEADS,
              "head_dim": HEAD_DIM, "page": PAGE, "sources": {k: str(v) for k, v in sources.items()}}  # fmt: skip
    device = torch.device("cuda" if cuda else "cpu")
    rec = record("cpu_attention_sweep", device, config, results) | {"command": " ".join(["python", *sys.argv])}
    path = Path(args.out) / "cpu_attention_sweep.json"
    write_json(path, rec)
    print(f"wrote {path} after {results['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
