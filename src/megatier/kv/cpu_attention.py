"""Decode attention on host CPU cores over KV pages in host memory (the DRAM tier computes in place).

Two implementations of one function, `cpu_attention`:
- "c": cpu_attention.c, compiled once with the system C compiler (-O3 -march=native -fopenmp) into the
  user cache and called through ctypes, which releases the GIL. It reads bf16 or fp32 pages in place
  and splits the work over threads in balanced tasks.
- "torch": gathers the pages and uses torch matmuls; the fallback where no C compiler is found.
`megatier bench tiers` measures both on the GPU machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch

from megatier.errors import MegatierError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast", "-shared", "-fPIC", "-std=gnu11"]

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def _cache_dir() -> Path:
    """$MEGATIER_CACHE_DIR, else $XDG_CACHE_HOME/megatier, else ~/.cache/megatier (as gguf_import)."""
    root = os.environ.get("MEGATIER_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatier")
    return Path(root).expanduser() / "cpu_attention"


def load_library() -> ctypes.CDLL | None:
    """The compiled C kernel, built on first use; None (with a logged reason) if it cannot be built."""
    global _lib, _lib_error
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if compiler is None:
            _lib_error = "no C compiler found"
            log.warning("CPU attention: %s; using the torch implementation", _lib_error)
            return None
        source = SOURCE.read_bytes()
        key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode() + os.uname().machine.encode())
        path = _cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            proc = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True
            )
            if proc.returncode != 0:
                _lib_error = f"compiling {SOURCE.name} failed: {proc.stderr.strip()[:500]}"
                log.warning("CPU attention: %s; using the torch implementation", _lib_error)
                return None
            os.replace(tmp, path)
        lib = ctypes.CDLL(str(path))
        i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
        lib.attend.restype = ctypes.c_int
        lib.attend.argtypes = [ptr, ptr, i32, i64, i64, i64, i32, i32, i32, i32, ptr, ptr, ptr, ctypes.c_float]
        lib.attend.argtypes += [ptr, ptr, i32, i32]
        lib.vector_width.restype = ctypes.c_int
        _lib = lib
        return lib


def default_threads() -> int:
    """Every core but one on a GPU machine (that one drives the GPU); every core otherwise."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1) if torch.cuda.is_available() else cores


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, D] (fp32, host) over host pages.

    pool [slots, 2, kv_heads, page_size, D]: one layer of a page pool (a strided view is fine as long as
    each (K|V, head) block is contiguous). Sequence b reads pool slots pages[offsets[b]:offsets[b+1]],
    rows[i] rows of slot pages[i]. Returns (out [B, H, D], lse [B, H]) fp32; a sequence with no pages
    gets out 0 and lse -inf.
    """
    lib = load_library() if impl in ("auto", "c") else None
    if impl == "c" and lib is None:
        raise MegatierError(f"the C CPU attention kernel is unavailable: {_lib_error}")
    if lib is not None and pool.dtype in (torch.bfloat16, torch.float32) and q.shape[-1] % lib.vector_width() == 0:
        return _attend_c(lib, q, pool, offsets, pages, rows, scale, threads or default_threads())
    if impl == "c":
        raise MegatierError("the C CPU attention kernel needs bf16 or fp32 KV and head_dim % vector_width() == 0")
    return _attend_torch(q, pool, offsets, pages, rows, scale)


def _attend_c(lib, q, pool, offsets, pages, rows, scale, threads):
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = pool.shape[2]
    if pool.stride(3) != head_dim or pool.stride(4) != 1:
        raise ValueError("each (K|V, head) block of a page must be contiguous")
    q = q.float().contiguous()
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    pages = np.ascontiguousarray(pages, dtype=np.int32)
    rows = np.ascontiguousarray(rows, dtype=np.int32)
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=torch.float32)
    lse = torch.empty((num_seqs, num_heads), dtype=torch.float32)
    # Enough tasks to keep every thread busy, none so small that scheduling costs more than reading.
    total = max(int(offsets[-1]), 1)
    chunk = max(1, min(64, total * num_kv_heads // (4 * threads)))
    rc = lib.attend(
        q.data_ptr(),
        pool.data_ptr(),
        0 if pool.dtype == torch.bfloat16 else 1,
        pool.stride(0),
        pool.stride(1),
        pool.stride(2),
        head_dim,
        num_kv_heads,
        num_heads // num_kv_heads,
        num_seqs,
        offsets.ctypes.data,
        pages.ctypes.data,
        rows.ctypes.data,
        scale,
        out.data_ptr(),
        lse.data_ptr(),
        chunk,
        threads,
    )
    if rc == -1:
        raise MemoryError("CPU attention: out of host memory for its work buffers")
    if rc != 0:
        raise ValueError(f"CPU attention: unsupported shape (head_dim {head_dim})")
    return out, lse


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
