"""The DRAM tier's attention partial, computed by host cores over pinned KV slices in place.

Per layer: q goes to pinned host memory, the C kernel (cpu_attention.c) attends over this step's DRAM
slices, and (out, lse) come back. On CUDA all three are queued on a side stream that forks from the
layer's q and joins before the merge, so the GPU's own partials run meanwhile: a small kernel writes q
into pinned memory and later reads the results from it (kernels/copy_slices.py: no memcpy nodes, whose
pinned-buffer bookkeeping does not belong in a graph), and the kernel runs as a CUDA host function (`cudaLaunchHostFunc`, the C entry point itself: no Python, no GIL), which a captured
CUDA graph records as a host node. So the same code runs eagerly and inside the graph executor's
captured decode step. The per-layer slice lists live in arrays the jobs point to; `set_lists` rewrites
them before each step, after waiting for the previous step.

Threads: the host function runs on CUDA's host-callback thread, which joins the C kernel's pinned pool
as one of its workers (`caller_works`); on CUDA the pool spins for `spin_us` after each layer's job, past
the GPU's gap to the next layer, so no layer of a step waits for sleeping threads to wake
(scripts/gpu_host_partial.py measures both against the old sleeping caller and 50 us spin).

Without CUDA (CI) the same job runs synchronously on the calling thread.
"""

from __future__ import annotations

import ctypes
import functools
import time

import numpy as np
import torch

from megatier.config import ModelConfig
from megatier.kernels.copy_slices import copy_slices
from megatier.kv.cpu_attention import cpu_attention, host_fn, make_job, run_job

# How long the pool spins after a layer's job on CUDA: longer than the GPU takes from one layer's host
# node to the next (~0.1-0.3 ms), short enough that the last layer's spin costs the step little.
LAYER_SPIN_US = 1000.0


class HostPartial:
    def __init__(self, pool: torch.Tensor, cfg: ModelConfig, scale: float, device: torch.device, threads: int | None):
        """pool: the DRAM slice pool [slots, 1, 2, kv_heads, page_size, head_dim] (pinned on CUDA)."""
        self.pool, self.cfg, self.scale, self.device, self.threads = pool[:, 0], cfg, scale, device, threads
        self.page_size = pool.shape[4]
        self.active = pool.shape[0] > 0
        self.cuda = device.type == "cuda"
        # The per-layer jobs' threading, read when they are built (A/B runs set them before the first step).
        # Without CUDA the model's own CPU work runs between layers: the pool must not spin through it.
        self.caller_works, self.spin_us = True, LAYER_SPIN_US if self.cuda else 0.0
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._rows = 0  # rows of the buffers below
        self._jobs: list = []
        self._lists: list[tuple[np.ndarray, np.ndarray]] = []
        self._elapsed = 0.0
        self._step_elapsed = 0.0
        self._bytes = 0
        self._index = torch.zeros(0, dtype=torch.int32, device=device)
        self._retired: list = []
        self.generation = 0  # bumped when the jobs are rebuilt: graphs that captured the old ones are stale

    # -- per step ----------------------------------------------------------------------------------------

    def set_lists(self, lists: list[tuple[np.ndarray, np.ndarray]], rows: int) -> None:
        """This step's slices for the host, per layer: (offsets [B + 1] int64, DRAM slots int32) over the
        first B of `rows` rows (the rest are padding and read nothing)."""
        if self.cuda:  # host jobs of a step still in flight read the current arrays (events recorded
            torch.cuda.current_stream(self.device).synchronize()  # inside a graph cannot be waited on)
        self._step_elapsed = sum(job.c.elapsed_ns for job in self._jobs) / 1e9 if self._jobs else 0.0
        self._elapsed += self._step_elapsed
        if not self.active:
            return
        self._ensure(rows, max((len(s) for _, s in lists), default=0))
        for layer, (offsets, slots) in enumerate(lists):
            job = self._jobs[layer]
            job.offsets_np[: len(offsets)] = offsets
            job.offsets_np[len(offsets) :] = offsets[-1]
            job.pages_np[: len(slots)] = slots
            job.c.num_seqs = rows
            job.work = len(slots)
            job.c.elapsed_ns = job.c.wake_ns = 0
            self._bytes += len(slots) * self.pool[0].numel() * self.pool.element_size()
        self._lists = lists

    def elapsed(self) -> float:
        """Host seconds in this partial since the last call (measured per job)."""
        out, self._elapsed = self._elapsed, 0.0
        return out

    def layer_times(self) -> list[tuple[float, float]]:
        """Per layer, (host seconds, seconds until the last pool thread started) of the step since
        set_lists; read once that step is done."""
        return [(job.c.elapsed_ns / 1e9, job.c.wake_ns / 1e9) for job in self._jobs]

    def last_busy_fraction(self, step_seconds: float) -> float:
        return self._step_elapsed / step_seconds if step_seconds > 0 else 0.0

    def take_bytes_read(self) -> int:
        out, self._bytes = self._bytes, 0
        return out

    # -- per layer ---------------------------------------------------------------------------------------

    def start(self, layer: int, q: torch.Tensor):
        """Queue (or, without CUDA, run) layer `layer`'s host partial for q [B, H, D]; a handle for
        `finish`, or None when the host has nothing to read (and no graph is being captured)."""
        if not self.active:
            return None
        job = self._jobs[layer]
        capturing = self.cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and job.work == 0:
            return None
        rows = q.shape[0]
        if not self.cuda:
            job.q[:rows].copy_(q.float())
            run_job(job.c)
            return layer
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            index = self._index[:rows]
            copy_slices(q.float().contiguous(), job.q, index, index)  # the GPU writes pinned memory itself
            launch_host_func(self.stream.cuda_stream, host_fn(), job.address)
        return layer

    def finish(self, handle: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [B, H, D], lse [B, H]) fp32 of a started partial, on the device, in stream order."""
        job = self._jobs[handle]
        rows = job.c.num_seqs
        if not self.cuda:
            return job.out[:rows].clone(), job.lse[:rows].clone()
        with torch.cuda.stream(self.stream):
            index = self._index[:rows]
            copy_slices(job.out, job.out_dev, index, index)  # and reads the results from it
            copy_slices(job.lse, job.lse_dev, index, index)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return job.out_dev[:rows], job.lse_dev[:rows]

    # -- eager extras: disk slices, sparse misses read by the host ---------------------------------------

    def disk_partial(self, q: torch.Tensor, lists: tuple[np.ndarray, np.ndarray], pools):
        """Partial over disk slices: read (checksummed) into host memory, then the C kernel."""
        offsets, slots = lists
        staging = torch.empty((len(slots), *pools.slice_shape), dtype=pools.dtype)
        t0 = time.perf_counter()
        pools.read_disk_slices(slots.tolist(), staging)
        rows = np.full(len(slots), self.page_size, dtype=np.int32)
        index = np.arange(len(slots), dtype=np.int32)
        out, lse = cpu_attention(q.float().cpu(), staging[:, 0], offsets, index, rows, self.scale, threads=self.threads)
        self._elapsed += time.perf_counter() - t0
        return out.to(q.device), lse.to(q.device)

    def sparse_partials(self, q, pages, missed, tier, slot, is_last, last_rows, pools) -> list:
        """Selected slices outside HBM read by the host (DRAM in place, disk staged): one host round trip."""
        from megatier.kv.tiers import DISK, DRAM

        host = [t.cpu().numpy() for t in (missed, tier, slot, is_last, last_rows)]
        missed, tier, slot, is_last, last_rows = host
        q_host = q.float().cpu()
        parts = []
        for which in (DRAM, DISK):
            mine = missed & (tier == which)
            if not mine.any():
                continue
            offsets = np.zeros(mine.shape[0] + 1, dtype=np.int64)
            offsets[1:] = np.cumsum(mine.sum(1))
            rows = np.where(is_last, last_rows[:, None], self.page_size)[mine].astype(np.int32)
            t0 = time.perf_counter()
            if which == DRAM:
                out, lse = cpu_attention(
                    q_host, self.pool, offsets, slot[mine].astype(np.int32), rows, self.scale, threads=self.threads
                )
                self._bytes += int(mine.sum()) * self.pool[0].numel() * self.pool.element_size()
            else:
                staging = torch.empty((int(mine.sum()), *pools.slice_shape), dtype=pools.dtype)
                pools.read_disk_slices(slot[mine].tolist(), staging)
                index = np.arange(len(staging), dtype=np.int32)
                out, lse = cpu_attention(q_host, staging[:, 0], offsets, index, rows, self.scale, threads=self.threads)
            self._elapsed += time.perf_counter() - t0
            parts.append((out.to(q.device), lse.to(q.device)))
        return parts

    # -- buffers -----------------------------------------------------------------------------------------

    def _ensure(self, rows: int, slices: int) -> None:
        """One job per layer over buffers for `rows` rows and `slices` slices (grown, never shrunk; the
        jobs are rewritten in place, so graphs that captured their addresses stay valid)."""
        heads, dim = self.cfg.num_heads, self.cfg.head_dim
        if rows > self._rows:
            self._rows = max(rows, 2 * self._rows)
            self._retired.append(self._jobs)  # graphs captured with them may still be kept by an executor
            self._jobs = []
        if not self._jobs:
            pin = self.cuda
            for _ in range(self.cfg.num_layers):
                job = _Job()
                job.q = torch.zeros((self._rows, heads, dim), dtype=torch.float32, pin_memory=pin)
                job.out = torch.zeros_like(job.q, pin_memory=pin) if pin else torch.zeros_like(job.q)
                job.lse = torch.zeros((self._rows, heads), dtype=torch.float32, pin_memory=pin)
                if self.cuda:
                    job.out_dev = torch.empty(job.out.shape, dtype=torch.float32, device=self.device)
                    job.lse_dev = torch.empty(job.lse.shape, dtype=torch.float32, device=self.device)
                job.offsets_np = np.zeros(self._rows + 1, dtype=np.int64)
                job.pages_np = np.zeros(max(1, slices), dtype=np.int32)
                job.rows_np = np.full(max(1, slices), self.page_size, dtype=np.int32)
                job.c = make_job(
                    job.q, self.pool, job.offsets_np, job.pages_np, job.rows_np, self.scale, job.out, job.lse,
                    threads=self.threads, caller_works=self.caller_works, spin_us=self.spin_us,
                )  # fmt: skip
                job.address = ctypes.addressof(job.c)
                self._jobs.append(job)
            self._retired.append(self._index)
            self._index = torch.arange(self._rows, dtype=torch.int32, device=self.device)
            self.generation += 1
        for job in self._jobs:
            if len(job.pages_np) < slices:
                job.pages_np = np.zeros(2 * slices, dtype=np.int32)
                job.rows_np = np.full(2 * slices, self.page_size, dtype=np.int32)
                job.c.pages, job.c.rows = job.pages_np.ctypes.data, job.rows_np.ctypes.data


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def launch_host_func(stream: int, fn: int, data: int) -> None:
    """cuLaunchHostFunc(stream, fn, data) through the driver itself. cuda-python's wrapper passes the
    driver a trampoline and a heap record of (fn, data) that it frees after the first call, so a captured
    graph's host node, which calls it on every replay, would read freed memory."""
    err = _libcuda().cuLaunchHostFunc(ctypes.c_void_p(stream), ctypes.c_void_p(fn), ctypes.c_void_p(data))
    if err:
        raise RuntimeError(f"cuLaunchHostFunc failed: CUresult {err}")


class _Job:
    """One layer's AttendJob and the buffers it points to."""

    q: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    out_dev: torch.Tensor
    lse_dev: torch.Tensor
    offsets_np: np.ndarray
    pages_np: np.ndarray
    rows_np: np.ndarray
    c: object
    address: int
    work: int = 0
