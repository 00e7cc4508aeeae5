"""Executors run the model over the paged KV cache; `create_executor` picks one by backend name."""

from __future__ import annotations

import importlib
import logging

import torch

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors.base import Executor
from megatier.kv.store import KVStore
from megatier.weights import ModelWeights

log = logging.getLogger(__name__)

# backend name -> "module:Class", imported only when chosen (GPU backends need triton / cuda-python).
BACKENDS = {
    "reference": "megatier.executors.reference:ReferenceExecutor",
    "cpu": "megatier.executors.cpu:CpuExecutor",
    "graph": "megatier.executors.graph:GraphExecutor",
    "megakernel": "megatier.executors.megakernel.runner:MegakernelExecutor",
}


def resolve_backend(backend: str, device: torch.device) -> str:
    """Check a backend name against the device; "auto" stays "auto" (decided once the model is known)."""
    if backend != "auto" and backend not in BACKENDS:
        raise MegatierError(f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    if backend == "cpu" and device.type != "cpu":
        raise MegatierError(f"backend 'cpu' runs on the host; use backend='auto' on {device.type}")
    if backend not in ("auto", "reference", "cpu") and device.type != "cuda":
        raise MegatierError(f"backend {backend!r} needs a CUDA device; use backend='cpu' on {device.type}")
    return backend


def choose_backend(backend: str, cfg: ModelConfig, cache: KVStore) -> str:
    """auto: the megakernel on Hopper GPUs (it decodes batches of up to 8 itself and hands prefill and
    larger batches to its own graph executor), graph on other GPUs and for tiered KV stores, the CPU
    backend (the reference with its decode on the host's C kernels) on the host. Why the megakernel cannot run is logged in one line."""
    backend = resolve_backend(backend, cache.device)
    if backend == "megakernel" and cache.tiered:
        raise MegatierError("megakernel: a tiered KV cache (kv_hbm/kv_dram/kv_disk) runs on backend 'graph'")
    if backend != "auto":
        return backend
    if cache.device.type != "cuda":
        return "cpu"
    if cache.tiered:
        log.info("backend auto: graph, not the megakernel (tiered KV runs on graph)")
        return "graph"
    try:
        from megatier.executors.megakernel.runner import check_device

        check_device(cfg, cache.dtype, cache.device)
    except (MegatierError, ImportError) as e:
        log.info("backend auto: graph, not the megakernel (%s)", str(e).removeprefix("megakernel: "))
        return "graph"
    return "megakernel"


def create_executor(backend: str, cfg: ModelConfig, weights: ModelWeights, cache: KVStore) -> Executor:
    """The one way every executor is built: on a KV store (the plain KVCache or a TieredKV)."""
    name = choose_backend(backend, cfg, cache)
    module, cls = BACKENDS[name].split(":")
    log.info("backend: %s", name)
    return getattr(importlib.import_module(module), cls)(cfg, weights, cache=cache)
