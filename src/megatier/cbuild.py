"""Run-time builds of megatier's C kernels (kv/cpu_attention.c, quant/quant_matmul.c).

A kernel is compiled once with the system C compiler ($CC, else gcc, else cc) into the user cache
(megatier.cache.cache_root()/<name>/), keyed by a hash of its source, the shared headers, the compiler and
the flags, and loaded with ctypes (which releases the GIL during calls). No -march: each SIMD variant
names its own target, so a library built on one machine runs on another; the library picks a variant at
run time. Without a compiler, or when the build fails, `build` returns None and the reason, which the
caller logs once and falls back to torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from megatier.cache import cache_root

INCLUDE = Path(__file__).parent  # threadpool.h
HEADERS = (INCLUDE / "threadpool.h",)
FLAGS = ["-O3", "-pthread", "-fno-math-errno", "-ffp-contract=fast", "-shared", "-fPIC", "-std=gnu11"]


def build(name: str, source: Path, flags: list[str] = FLAGS) -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why not)."""
    compiler = shutil.which(os.environ["CC"]) if os.environ.get("CC") else shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None, "no C compiler found"
    text = source.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    key = hashlib.sha256(text + " ".join([compiler, *flags]).encode() + os.uname().machine.encode())
    path = cache_root() / name / f"{name}-{key.hexdigest()[:16]}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, *flags, f"-I{INCLUDE}", str(source), "-o", str(tmp), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"compiling {source.name} failed: {proc.stderr.strip()[:500]}"
        os.replace(tmp, path)
    return ctypes.CDLL(str(path)), None


def default_threads() -> int:
    """Every core but one on a GPU machine (that one drives the GPU); every core otherwise."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1) if torch.cuda.is_available() else cores


def isa_id(lib: ctypes.CDLL, isas: tuple[str, ...], isa: str | None, what: str) -> int:
    """The C enum value of `isa` ("auto"/None: the library's best_isa()); a one-line error naming `what`
    if it is unknown or this CPU lacks it."""
    from megatier.errors import MegatierError

    if isa in (None, "auto"):
        return lib.best_isa()
    if isa not in isas:
        raise MegatierError(f"unknown {what} isa {isa!r}; choose from auto, {', '.join(isas)}")
    if not lib.isa_supported(isas.index(isa)):
        have = ", ".join(name for i, name in enumerate(isas) if lib.isa_supported(i))
        raise MegatierError(f"this CPU cannot run the {isa} {what} kernel (it runs {have})")
    return isas.index(isa)
