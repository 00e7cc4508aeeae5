"""The reference executor over N processes: this one (rank 0, where the engine runs) and N - 1 workers.

Each rank runs `ReferenceExecutor` on its shard (parallel.py) with its own KV cache of its own KV heads.
Per step rank 0 sends the batch (fed tokens resolved) to the workers with one broadcast_object_list on
a gloo group, then every rank runs the same forward pass; the all-reduces and the logit all-gather
inside it keep them in lock step, and rank 0 returns the gathered logits to the engine.

Workers are `python -m megatier.executors.tensor_parallel` subprocesses, not multiprocessing children:
a spawned child re-imports the parent's main module, which would build the LLM again in a script that
calls `LLM(...)` at the top level. Each worker loads the checkpoint itself and keeps its slices. They
meet at a TCPStore that rank 0 opens on a free localhost port. A worker that dies makes rank 0's next
collective fail at once (gloo sees the closed connection); that becomes a MegatierError naming the
rank, and the group is torn down. `close()` (also at exit) stops the workers and leaves the process
free to start another group.
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

import megatier
from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.loader import load_weights
from megatier.parallel import STEP_TIMEOUT, Shard, init_process_group, shard_config, shard_weights
from megatier.weights import ModelWeights

HOST = "127.0.0.1"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard: the resolved model and the KV cache's shape."""

    model_path: Path
    cfg: ModelConfig  # the whole model's
    load_format: str
    quantization: str
    seed: int
    dtype: torch.dtype
    device: torch.device
    num_pages: int
    page_size: int
    size: int
    port: int = 0  # rank 0's TCPStore, filled in when it is open


class TensorParallelExecutor:
    """Rank 0: the Executor the engine sees (its `cache` is rank 0's share, with the pages all ranks use)."""

    name = "reference"

    def __init__(self, spec: WorkerSpec, weights: ModelWeights, cache: KVCache):
        if dist.is_initialized():
            raise MegatierError(
                "torch.distributed is already initialized here (another tensor-parallel LLM?): close it first"
            )
        own = shard_weights(weights, spec.cfg, 0, spec.size)  # before any worker starts: bad weights fail here
        self.cache, self.device, self.page_size, self.num_pages = cache, cache.device, cache.page_size, cache.num_pages
        self.weight_bytes = own.numel() * cache.dtype.itemsize
        self._store = dist.TCPStore(HOST, 0, spec.size, True, timeout=STEP_TIMEOUT, wait_for_workers=False)
        spec = replace(spec, port=self._store.port)
        self._commands: dist.ProcessGroup | None = None
        self._closed = False
        self._workers = [_start_worker(spec, rank) for rank in range(1, spec.size)]
        atexit.register(self.close)
        try:
            self._wait_until_ready()
            self._commands = init_process_group(self._store, 0, spec.size, self.device)
            self.inner = ReferenceExecutor(
                shard_config(spec.cfg, spec.size), own, cache=cache, shard=Shard(0, spec.size)
            )
        except BaseException:
            self._shutdown(graceful=False)
            raise
        self.cfg = self.inner.cfg

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._workers]

    def forward(self, batch: StepBatch) -> torch.Tensor:
        if self._commands is None:
            raise MegatierError("the tensor-parallel workers are stopped (LLM closed, or a worker failed)")
        host = replace(batch, token_ids=batch.token_tensor(torch.device("cpu")).tolist(), fed=None, fed_at=[])
        try:
            dist.broadcast_object_list([host], src=0, group=self._commands)
            return self.inner.forward(host)
        except BaseException as e:  # the ranks are out of step now: stop them all
            dead = self._exited_worker(wait=1.0) if isinstance(e, RuntimeError) else None
            self._shutdown(graceful=False)
            if dead is None:
                raise
            raise MegatierError(
                f"tensor-parallel worker rank {dead[0]} exited with code {dead[1]} (its traceback is above)"
            ) from e

    def close(self) -> None:
        """Tell the workers to stop, wait for them, leave the group (also at exit)."""
        self._shutdown(graceful=True)

    def _shutdown(self, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        commands, self._commands = self._commands, None
        graceful = graceful and commands is not None
        if graceful:
            try:
                dist.broadcast_object_list([None], src=0, group=commands)
            except RuntimeError:
                graceful = False  # a worker is gone already
        for p in self._workers:
            if not graceful:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _wait_until_ready(self) -> None:
        """Each worker marks the store once its shard is loaded; one that exits first fails the start."""
        deadline = time.monotonic() + STEP_TIMEOUT.total_seconds()
        for rank in range(1, len(self._workers) + 1):
            while not self._store.check([f"ready/{rank}"]):
                if (dead := self._exited_worker(wait=0)) is not None:
                    raise MegatierError(
                        f"tensor-parallel worker rank {dead[0]} exited with code {dead[1]} while starting "
                        "(its traceback is above)"
                    )
                if time.monotonic() > deadline:
                    raise MegatierError(f"tensor-parallel worker rank {rank} did not start in {STEP_TIMEOUT}")
                time.sleep(0.02)

    def _exited_worker(self, wait: float) -> tuple[int, int] | None:
        """(rank, exit code) of the first worker found exited, waiting up to `wait` s for one to be."""
        deadline = time.monotonic() + wait
        while True:
            for rank, p in enumerate(self._workers, 1):
                if p.poll() is not None:
                    return rank, p.returncode
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)


def _start_worker(spec: WorkerSpec, rank: int) -> subprocess.Popen:
    """A worker process, handed its spec on stdin; it finds megatier where this process did."""
    env = dict(os.environ)
    src = str(Path(megatier.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    p = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, env=env)
    p.stdin.write(pickle.dumps((spec, rank)))
    p.stdin.close()
    return p


def worker_main() -> None:
    """Load and shard, join the group, then run every step rank 0 sends until it sends None."""
    spec, rank = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.size))
    store = dist.TCPStore(HOST, spec.port, spec.size, False, timeout=STEP_TIMEOUT)
    full = load_weights(
        spec.model_path,
        spec.cfg,
        load_format=spec.load_format,
        quantization=spec.quantization,
        seed=spec.seed,
        dtype=spec.dtype,
        device=spec.device,
    )
    own = shard_weights(full, spec.cfg, rank, spec.size)
    del full
    cfg = shard_config(spec.cfg, spec.size)
    cache = KVCache.allocate(cfg, spec.num_pages, spec.page_size, spec.dtype, spec.device)
    store.set(f"ready/{rank}", "1")
    commands = init_process_group(store, rank, spec.size, spec.device)
    executor = ReferenceExecutor(cfg, own, cache=cache, shard=Shard(rank, spec.size))
    while True:
        step = [None]
        dist.broadcast_object_list(step, src=0, group=commands)
        if step[0] is None:
            break
        executor.forward(step[0])
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main()
