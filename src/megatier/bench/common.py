"""What every benchmark record carries: the machine, the code version, and the device's copy bandwidth."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def git_commit() -> str | None:
    """HEAD (with -dirty if tracked files changed); $MEGATIER_COMMIT where the tree travels without .git."""
    if os.environ.get("MEGATIER_COMMIT"):
        return os.environ["MEGATIER_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def model_config(llm) -> dict:
    """The loaded model's part of a record's config."""
    return {"model": str(llm.model_path), "dtype": str(llm.dtype).removeprefix("torch.")}


def record(kind: str, device: torch.device, config: dict, results: dict) -> dict:
    return {
        "bench": kind,
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["megatier", *sys.argv[1:]]) if sys.argv else None,
        "config": config,
        "results": results,
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share: the index of their first divergence."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def cuda_time(fn: Callable[[], object], iters: int, warmup: int = 3) -> list[float]:
    """Seconds per call of `fn`, timed with CUDA events, one sample per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    src = torch.randint(0, 2**15, (nbytes // 2,), dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    times = cuda_time(lambda: dst.copy_(src), iters)
    return 2 * nbytes / statistics.median(times)


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device read bandwidth in bytes/s: a sum over a buffer (bytes read only; the result is 4 bytes).
    A decode step mostly reads, so the weight-streaming floor is weight bytes over this, not over the
    copy bandwidth (which also pays for writes, and which a read-mostly kernel can beat)."""
    src = torch.rand(nbytes // 4, dtype=torch.float32, device=device)
    times = cuda_time(lambda: src.sum(), iters)
    return nbytes / statistics.median(times)
