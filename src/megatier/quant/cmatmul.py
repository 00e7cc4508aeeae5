"""x @ W^T for a QuantWeight on host cores by the C kernel quant_matmul.c (built at run time, megatier.cbuild).

The kernel reads the planes in place, unpacks each 32-weight sub-block in registers and multiplies it with
every row of x (fp32 accumulation): AVX-512, AVX2+FMA or scalar, chosen at run time (`auto_isa()` says
which), the output features split over OpenMP threads (torch's pool: see load_library), or where the
compiler has no OpenMP over megatier's thread pool (threadpool.h) whose worker 0 is the calling thread.
quant/cpu.py's `linear` sends small-M CPU products here when the library loads (else its torch path).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import threading
from pathlib import Path

import torch

from megatier import cbuild
from megatier.errors import MegatierError
from megatier.quant.blocks import QuantWeight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_matmul.c")
ISAS = ("scalar", "avx2", "avx512")  # the C enum's order
KINDS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "FP8")  # the C enum's order
# Plane names by kind, in the job's (d, m, q, sc, mn) order; None: unused.
PLANES = {
    "Q8_0": ("d", None, "q", None, None),
    "Q4_0": ("d", None, "q", None, None),
    "Q4_1": ("d", "m", "q", None, None),
    "Q4_K": ("d", "dmin", "q", "sc", "mn"),
    "FP8": ("scale", None, "q", None, None),
}

# Calls by ISA name (tests check the path).
CALLS: collections.Counter[str] = collections.Counter()

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


class QJob(ctypes.Structure):
    """qjob_t of quant_matmul.c, field for field."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("q", ctypes.c_void_p),
        ("sc", ctypes.c_void_p),
        ("mn", ctypes.c_void_p),
        ("M", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("kind", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("isa", ctypes.c_int32),
        ("status", ctypes.c_int32),
    ]


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (with one logged reason) if it cannot be built."""
    global _lib, _lib_error
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        # OpenMP first: its threads are torch's own (torch's libgomp is already loaded under the same
        # soname), so the kernel never competes for cores with torch threads still spinning after an op.
        lib, _lib_error = cbuild.build("quant_matmul", SOURCE, [*cbuild.FLAGS, "-fopenmp"])
        if lib is None:
            lib, _lib_error = cbuild.build("quant_matmul", SOURCE)
        if lib is None:
            log.warning("quantized CPU matmul: %s; using the torch implementation", _lib_error)
            return None
        if lib.qjob_size() != ctypes.sizeof(QJob):
            raise RuntimeError("QJob does not match qjob_t in quant_matmul.c")
        lib.qmatmul.argtypes = [ctypes.c_void_p]
        lib.qmatmul.restype = None
        lib.isa_supported.argtypes = [ctypes.c_int]
        _lib = lib
        return lib


def supported_isas() -> list[str]:
    """The kernel's SIMD variants this CPU runs (none without a C compiler)."""
    lib = load_library()
    return [name for i, name in enumerate(ISAS) if lib is not None and lib.isa_supported(i)]


def auto_isa() -> str | None:
    """The variant isa=None runs here, or None where the kernel is unavailable."""
    lib = load_library()
    return ISAS[lib.best_isa()] if lib is not None else None


def usable(w: QuantWeight) -> bool:
    """Whether the kernel is built and takes this weight (contiguous host planes, K a whole number of
    blocks); the first call builds it."""
    if (_lib if _lib is not None else load_library()) is None:
        return False
    block = 256 if w.kind == "Q4_K" else 32
    return w.shape[1] % block == 0 and all(name is None or w.planes[name].is_contiguous() for name in PLANES[w.kind])


def _template(lib: ctypes.CDLL, w: QuantWeight) -> QJob:
    """The job fields that depend on the weight only, kept on it (decode calls each weight's matmul once
    per layer and step: building the job each time costs more than a small product); rebuilt if a plane
    was replaced."""
    names = PLANES[w.kind]
    cached = getattr(w, "_c_job", None)
    if cached is not None and all(
        name is None or w.planes[name] is p for name, p in zip(names, cached[1], strict=True)
    ):
        return cached[0]
    planes = tuple(None if name is None else w.planes[name] for name in names)
    if any(p is not None and (p.device.type != "cpu" or not p.is_contiguous()) for p in planes):
        raise ValueError("the weight's planes must be contiguous host tensors")
    n, k = w.shape
    job = QJob(None, None, *[None if p is None else p.data_ptr() for p in planes], 0, n, k, KINDS.index(w.kind))
    w._c_job = (job, planes)
    return job


def make_job(
    x: torch.Tensor, w: QuantWeight, y: torch.Tensor, *, threads: int | None = None, isa: str | None = None
) -> QJob:
    """The job for y = x @ W^T over these buffers, used in place (x [M, K] and y [M, N] contiguous fp32
    host tensors), so a caller may run it again on new contents of x (qmatmul_fn() runs it from C)."""
    lib = _lib if _lib is not None else load_library()
    if lib is None:
        raise MegatierError(f"the C quantized matmul kernel is unavailable: {_lib_error}")
    n, k = w.shape
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous fp32 host tensor of shape [M, {k}]")
    if y.dtype != torch.float32 or y.shape != (x.shape[0], n) or y.device.type != "cpu" or not y.is_contiguous():
        raise ValueError(f"y must be a contiguous fp32 host tensor of shape [{x.shape[0]}, {n}]")
    job = QJob.from_buffer_copy(_template(lib, w))
    job.x, job.y, job.M = x.data_ptr(), y.data_ptr(), x.shape[0]
    job.threads = threads or _default_threads()
    job.isa = _best_isa(lib) if isa in (None, "auto") else cbuild.isa_id(lib, ISAS, isa, "quantized matmul")
    job.keep = (x, y, w)
    return job


def check_job(job: QJob, w: QuantWeight) -> None:
    """Raise for a job the kernel refused (its status), and count the call by variant."""
    if job.status == -1:
        raise MemoryError("quantized matmul: out of host memory for its work buffer")
    if job.status != 0:
        n, k = w.shape
        raise ValueError(f"quantized matmul: the C kernel refused a {w.kind} {n}x{k} weight (status {job.status})")
    CALLS[ISAS[job.isa]] += 1


def qmatmul_fn() -> int:
    """The address of qmatmul(qjob_t *), for C code that runs prepared jobs (executors/cpu_step.c)."""
    lib = _lib if _lib is not None else load_library()
    if lib is None:
        raise MegatierError(f"the C quantized matmul kernel is unavailable: {_lib_error}")
    return ctypes.cast(lib.qmatmul, ctypes.c_void_p).value


def matmul(x: torch.Tensor, w: QuantWeight, *, threads: int | None = None, isa: str | None = None) -> torch.Tensor:
    """x [M, K] fp32 on the host @ W^T -> [M, N] fp32. isa forces a variant (one of ISAS; this CPU must
    have it). Raises if the kernel is unavailable; the planes must be contiguous host tensors (as loaded)."""
    if x.dtype == torch.float32 and x.dim() == 2:
        x = x.contiguous()
    y = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)
    job = make_job(x, w, y, threads=threads, isa=isa)
    _lib.qmatmul(ctypes.byref(job))
    check_job(job, w)
    return y


@functools.cache
def _default_threads() -> int:
    return cbuild.default_threads()


@functools.cache
def _best_isa(lib: ctypes.CDLL) -> int:
    return lib.best_isa()
