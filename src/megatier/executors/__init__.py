"""Executors run the model over the paged KV cache; `create_executor` picks one by backend name."""

from __future__ import annotations

import importlib
import logging

import torch

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors.base import Executor
from megatier.kv.pages import KVCache
from megatier.weights import ModelWeights

log = logging.getLogger(__name__)

# backend name -> "module:Class", imported only when chosen (GPU backends need triton / cuda-python).
BACKENDS = {
    "reference": "megatier.executors.reference:ReferenceExecutor",
    "graph": "megatier.executors.graph:GraphExecutor",
}


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise MegatierError(f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "graph" if device.type == "cuda" else "reference"
    if backend != "reference" and device.type != "cuda":
        raise MegatierError(f"backend {backend!r} needs a CUDA device; use backend='reference' on {device.type}")
    return backend


def create_executor(backend: str, cfg: ModelConfig, weights: ModelWeights, cache: KVCache) -> Executor:
    name = resolve_backend(backend, cache.kv.device)
    module, cls = BACKENDS[name].split(":")
    log.info("backend: %s", name)
    return getattr(importlib.import_module(module), cls)(cfg, weights, cache=cache)
