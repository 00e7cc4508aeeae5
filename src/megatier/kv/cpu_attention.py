"""Decode attention on host CPU cores over KV pages in host memory (the DRAM tier computes in place).

Two implementations of one function, `cpu_attention`:
- "c": cpu_attention.c, compiled once with the system C compiler into the user cache and called through
  ctypes, which releases the GIL. It reads bf16 or fp32 pages in place with the widest SIMD this CPU has
  (AVX-512-BF16, AVX-512, AVX2 or scalar, chosen at run time; `auto_isa()` says which) on a persistent
  pool of pinned threads, which the calling thread joins. Calls run one at a time, from any thread.
- "torch": gathers the pages and uses torch matmuls; the fallback where no C compiler is found or the
  KV dtype is neither bf16 nor fp32.
Every C call goes through `attend_job(AttendJob *)`, which a CUDA host function can also call directly
(`host_fn()`). `host_read_bandwidth()` measures what the same threads can read; `megatier bench tiers
--micro` (or `python -m megatier.bench.tier_micro`) compares the two. `call_on_native_thread` and
`thread_info` reproduce and inspect the host-callback context (tests, scripts/gpu_host_partial.py).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from megatier import cbuild
from megatier.errors import MegatierError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
ISAS = ("scalar", "avx2", "avx512", "avx512bf16")  # the C enum's order
IMPLS = ("auto", "c", "torch")
MAX_GROUP_FLOATS = 1 << 15  # the C limit on G x head_dim (padded to 32)

# Calls by implementation: an ISA name for the C kernel, "torch" for the fallback (tests check the path).
CALLS: collections.Counter[str] = collections.Counter()

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


class AttendJob(ctypes.Structure):
    """attend_job_t of cpu_attention.c, field for field: every argument of one call. The pointers are raw:
    `make_job` keeps the buffers they point to alive in `keep`; the arrays are read when the job runs."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("kv", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("pages", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("page_stride", ctypes.c_int64),
        ("v_offset", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("dtype", ctypes.c_int32),
        ("D", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("G", ctypes.c_int32),
        ("num_seqs", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("isa", ctypes.c_int32),
        ("caller_works", ctypes.c_int32),
        ("status", ctypes.c_int32),
        ("spin_ns", ctypes.c_int64),
        ("elapsed_ns", ctypes.c_int64),
        ("wake_ns", ctypes.c_int64),
        ("runs", ctypes.c_int64),
    ]


class ThreadInfo(ctypes.Structure):
    """thread_info_t: who ran a `thread_info_fn()` host function."""

    _fields_ = [
        ("mask_cpus", ctypes.c_int32),
        ("cpu", ctypes.c_int32),
        ("policy", ctypes.c_int32),
        ("nice", ctypes.c_int32),
        ("tid", ctypes.c_int64),
    ]


def load_library() -> ctypes.CDLL | None:
    """The compiled C kernel, built on first use (megatier.cbuild); None (with a logged reason) if it
    cannot be built."""
    global _lib, _lib_error
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        lib, _lib_error = cbuild.build("cpu_attention", SOURCE)
        if lib is None:
            log.warning("CPU attention: %s; using the torch implementation", _lib_error)
            return None
        if lib.attend_job_size() != ctypes.sizeof(AttendJob):
            raise RuntimeError("AttendJob does not match attend_job_t in cpu_attention.c")
        lib.attend_job.argtypes = [ctypes.c_void_p]
        lib.attend_job.restype = None
        lib.isa_supported.argtypes = [ctypes.c_int]
        lib.read_bandwidth.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        lib.read_bandwidth.restype = ctypes.c_double
        lib.call_on_native_thread.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        _lib = lib
        return lib


default_threads = cbuild.default_threads


def supported_isas() -> list[str]:
    """The C kernel's SIMD variants this CPU runs (none without a C compiler)."""
    lib = load_library()
    return [name for i, name in enumerate(ISAS) if lib is not None and lib.isa_supported(i)]


def auto_isa() -> str | None:
    """The variant impl="auto" runs here, or None where the C kernel is unavailable."""
    lib = load_library()
    return ISAS[lib.best_isa()] if lib is not None else None


def host_fn() -> int:
    """The address of attend_job, a cudaHostFn_t: cudaLaunchHostFunc(stream, host_fn(), addressof(job))."""
    lib = _require_library()
    return ctypes.cast(lib.attend_job, ctypes.c_void_p).value


def thread_info_fn() -> int:
    """The address of thread_info, a cudaHostFn_t that fills a ThreadInfo about the thread running it."""
    return ctypes.cast(_require_library().thread_info, ctypes.c_void_p).value


def call_on_native_thread(fn: int, arg: int, cpu: int = -1) -> None:
    """fn(arg) (a C function's address) on a new native thread unknown to Python, as CUDA runs a host
    function; pinned to `cpu` if >= 0. Returns once it has run."""
    err = _require_library().call_on_native_thread(fn, arg, cpu)
    if err:
        raise OSError(err, "pthread_create failed")


def pool_cpus() -> int:
    """How many CPUs the C kernel's pool pins its threads to (the process's affinity mask)."""
    return _require_library().attend_pool_cpus()


def _require_library() -> ctypes.CDLL:
    lib = load_library()
    if lib is None:
        raise MegatierError(f"the C CPU attention kernel is unavailable: {_lib_error}")
    return lib


def _isa_id(lib: ctypes.CDLL, isa: str | None) -> int:
    return cbuild.isa_id(lib, ISAS, isa, "CPU attention")


def _unsupported(q: torch.Tensor, pool: torch.Tensor) -> str | None:
    """Why the C kernel cannot take these inputs, or None."""
    if pool.dtype not in (torch.bfloat16, torch.float32):
        return f"needs bf16 or fp32 KV, not {pool.dtype}"
    group, head_dim = q.shape[1] // pool.shape[2], q.shape[2]
    if group * -(-head_dim // 32) * 32 > MAX_GROUP_FLOATS:
        return f"takes at most {MAX_GROUP_FLOATS} query-head x head_dim values per kv head"
    return None


def make_job(
    q: torch.Tensor,
    pool: torch.Tensor,
    offsets: np.ndarray,
    pages: np.ndarray,
    rows: np.ndarray,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    threads: int | None = None,
    isa: str | None = None,
    caller_works: bool = True,
    spin_us: float = 0.0,
) -> AttendJob:
    """An AttendJob over these buffers, used in place: q fp32 [B, H, D] and out/lse fp32 [B, H, D] / [B, H]
    contiguous, offsets int64, pages and rows int32 C-contiguous (see cpu_attention). Whatever is in them
    when the job runs is what it reads, so a caller may rewrite them between runs. caller_works: the
    thread that runs the job is one of its `threads` (else it sleeps while the pool works); spin_us: how
    long the pool spins for the next job once done (0: the library's 50 us). The pool's threads are
    started here, from this thread, not from whichever thread runs the job first."""
    lib = _require_library()
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = pool.shape[2]
    if pool.stride(3) != head_dim or pool.stride(4) != 1:
        raise ValueError("each (K|V, head) block of a page must be contiguous")
    for name, t, shape in (("q", q, q.shape), ("out", out, q.shape), ("lse", lse, q.shape[:2])):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != shape or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous fp32 host tensor of shape {tuple(shape)}")
    for name, a, dtype in (("offsets", offsets, np.int64), ("pages", pages, np.int32), ("rows", rows, np.int32)):
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array")
    if len(offsets) != num_seqs + 1 or num_heads % num_kv_heads:
        raise ValueError("offsets needs B + 1 entries and the query heads a multiple of the kv heads")
    job = AttendJob(
        q=q.data_ptr(),
        kv=pool.data_ptr(),
        offsets=offsets.ctypes.data,
        pages=pages.ctypes.data,
        rows=rows.ctypes.data,
        out=out.data_ptr(),
        lse=lse.data_ptr(),
        page_stride=pool.stride(0),
        v_offset=pool.stride(1),
        head_stride=pool.stride(2),
        scale=scale,
        dtype=0 if pool.dtype == torch.bfloat16 else 1,
        D=head_dim,
        num_kv_heads=num_kv_heads,
        G=num_heads // num_kv_heads,
        num_seqs=num_seqs,
        threads=threads or default_threads(),
        isa=_isa_id(lib, isa),
        caller_works=int(caller_works),
        spin_ns=int(spin_us * 1e3),
    )
    lib.attend_pool_start(job.threads - job.caller_works)
    job.keep = (q, pool, offsets, pages, rows, out, lse)
    return job


def run_job(job: AttendJob) -> None:
    """Run one job on the C kernel (blocking; the GIL is released meanwhile)."""
    _require_library().attend_job(ctypes.byref(job))
    check_job(job)


def check_job(job: AttendJob) -> None:
    """Raise for a job the kernel refused (its status), and count the call by variant."""
    if job.status == -1:
        raise MemoryError("CPU attention: out of host memory for its work buffers")
    if job.status == -3:
        raise MegatierError(
            f"this CPU cannot run CPU attention kernel variant {job.isa} (it runs {', '.join(supported_isas())})"
        )
    if job.status != 0:
        raise ValueError(f"CPU attention: the C kernel refused the job (status {job.status})")
    CALLS[ISAS[job.isa]] += 1


def cpu_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    offsets: np.ndarray,
    pages: np.ndarray,
    rows: np.ndarray,
    scale: float,
    *,
    threads: int | None = None,
    impl: str = "auto",
    isa: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, D] (fp32, host) over host pages.

    pool [slots, 2, kv_heads, page_size, D]: one layer of a page pool (a strided view is fine as long as
    each (K|V, head) block is contiguous). Sequence b reads pool slots pages[offsets[b]:offsets[b+1]],
    rows[i] rows of slot pages[i]. Returns (out [B, H, D], lse [B, H]) fp32; a sequence with no pages
    gets out 0 and lse -inf. impl: "auto" (C where it can, else torch), "c" or "torch"; isa forces a
    SIMD variant of the C kernel (one of ISAS; the CPU must have it).
    """
    if impl not in IMPLS:
        raise MegatierError(f"unknown CPU attention impl {impl!r}; choose from {', '.join(IMPLS)}")
    if impl == "torch" and isa not in (None, "auto"):
        raise MegatierError("isa picks a variant of the C kernel; it does not apply to impl='torch'")
    lib = _require_library() if impl == "c" else load_library() if impl == "auto" else None
    reason = _unsupported(q, pool) if lib is not None else "is unavailable"
    if reason is None:
        return _attend_c(q, pool, offsets, pages, rows, scale, threads, isa)
    if impl == "c":
        raise MegatierError(f"the C CPU attention kernel {reason}")
    CALLS["torch"] += 1
    return _attend_torch(q, pool, offsets, pages, rows, scale)


def _attend_c(q, pool, offsets, pages, rows, scale, threads, isa):
    q = q.float().contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    pages = np.ascontiguousarray(pages, dtype=np.int32)
    rows = np.ascontiguousarray(rows, dtype=np.int32)
    run_job(make_job(q, pool, offsets, pages, rows, scale, out, lse, threads=threads, isa=isa))
    return out, lse


def host_read_bandwidth(nbytes: int = 1 << 30, threads: int | None = None, reps: int = 5) -> float:
    """Bytes/s at which the C kernel's threads read a host buffer of nbytes (the best of reps passes): the
    memory bound the kernel is measured against."""
    lib = _require_library()
    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.fill_(0x5A)  # touched, so every page is real memory (an untouched one reads the shared zero page)
    return lib.read_bandwidth(buf.data_ptr(), nbytes, threads or default_threads(), reps)


def _attend_torch(q, pool, offsets, pages, rows, scale):
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, page_size = pool.shape[2], pool.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros((num_seqs, num_heads, head_dim), dtype=torch.float32)
    lse = torch.full((num_seqs, num_heads), float("-inf"))
    for b in range(num_seqs):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        if lo == hi:
            continue
        blocks = pool[torch.from_numpy(pages[lo:hi].astype(np.int64))].float()  # [n, 2, Hkv, P, D]
        valid = torch.arange(page_size)[None, :] < torch.from_numpy(rows[lo:hi].astype(np.int64))[:, None]
        k = blocks[:, 0].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
        v = blocks[:, 1].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
        qg = q[b].float().reshape(num_kv_heads, group, head_dim)
        scores = torch.einsum("hgd,htd->hgt", qg, k) * scale
        scores = scores.masked_fill(~valid.reshape(1, 1, -1), float("-inf"))
        lse_b = torch.logsumexp(scores, dim=-1)
        out[b] = torch.einsum("hgt,htd->hgd", torch.exp(scores - lse_b[..., None]), v).reshape(num_heads, head_dim)
        lse[b] = lse_b.reshape(num_heads)
    return out, lse
