"""Tensor parallelism over torch.distributed: which slice of each weight a rank keeps, and the collectives.

Megatron-style: rank r of N keeps q heads [r H/N, (r+1) H/N) and the same share of the KV heads (and of
the KV cache), and the same share of the intermediate dimension of gate and up. o and down keep the
matching slice of their input dimension (Megatron's row-parallel layers), so each rank's o and down
outputs are partial sums: one all-reduce after attention, one after the MLP, their biases added once
after it. The LM head is split by vocabulary rows (padded to a multiple of N) and the logit shards are
all-gathered. Embedding and norms are replicated. `Shard` is everything an executor calls: the reference
executor today, and the one place a CUDA-graph executor would call too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.weights import ModelWeights

STEP_TIMEOUT = timedelta(minutes=5)  # one collective inside a step (a stuck rank fails the step)
IDLE_TIMEOUT = timedelta(days=365)  # a worker waiting for the next step, however long the engine idles


def check_tensor_parallel(size: int, cfg: ModelConfig, *, backend: str, device: torch.device, tiered: bool) -> None:
    """What tensor_parallel_size=`size` runs today: the reference backend on the CPU (gloo), plain KV."""
    if size < 1:
        raise MegatierError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if backend not in ("auto", "reference"):
        raise MegatierError(
            f"tensor_parallel_size {size} needs backend 'reference', not {backend!r}, until NCCL tensor "
            "parallelism is run on a multi-GPU machine"
        )
    if device.type != "cpu":
        raise MegatierError(
            f"tensor_parallel_size {size} runs on device 'cpu' (gloo), not {device.type!r}, until NCCL is run "
            "on a multi-GPU machine"
        )
    if tiered:
        raise MegatierError(f"tensor_parallel_size {size} runs on the plain KV cache, not the tiered one")
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(cfg, name) % size:
            raise MegatierError(f"tensor_parallel_size {size} must divide the model's {name} {getattr(cfg, name)}")


def shard_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The config one rank computes with: its heads and intermediate share; the vocabulary stays whole
    (the executor returns gathered logits)."""
    return replace(
        cfg,
        num_heads=cfg.num_heads // size,
        num_kv_heads=cfg.num_kv_heads // size,
        intermediate_size=cfg.intermediate_size // size,
    )


def vocab_rows(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's LM-head rows [start, end); every shard is padded to ceil(vocab / size) rows."""
    per = -(-vocab_size // size)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)


def shard_weights(w: ModelWeights, cfg: ModelConfig, rank: int, size: int) -> ModelWeights:
    """Rank's slices (copies, so the whole checkpoint can be dropped) of the full weights `w` of `cfg`."""
    if w.is_quantized():
        raise MegatierError(
            f"tensor_parallel_size {size} needs plain weights, not {', '.join(w.quant_kinds())} blocks: "
            "pass quantization='none'"
        )
    q, kv, inter = cfg.q_size // size, cfg.kv_size // size, cfg.intermediate_size // size

    def rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
        return None if t is None else t[rank * n : (rank + 1) * n].clone()

    def cols(t: torch.Tensor, n: int) -> torch.Tensor:
        return t[:, rank * n : (rank + 1) * n].clone(memory_format=torch.contiguous_format)

    layers = [
        replace(
            layer,
            q_proj=rows(layer.q_proj, q),
            k_proj=rows(layer.k_proj, kv),
            v_proj=rows(layer.v_proj, kv),
            q_bias=rows(layer.q_bias, q),
            k_bias=rows(layer.k_bias, kv),
            v_bias=rows(layer.v_bias, kv),
            o_proj=cols(layer.o_proj, q),
            gate_proj=rows(layer.gate_proj, inter),
            up_proj=rows(layer.up_proj, inter),
            gate_bias=rows(layer.gate_bias, inter),
            up_bias=rows(layer.up_bias, inter),
            down_proj=cols(layer.down_proj, inter),
        )
        for layer in w.layers
    ]
    start, end = vocab_rows(cfg.vocab_size, rank, size)
    lm_head = w.lm_head.new_zeros((-(-cfg.vocab_size // size), cfg.hidden_size))
    lm_head[: end - start] = w.lm_head[start:end]
    return ModelWeights(embed=w.embed, layers=layers, final_norm=w.final_norm, lm_head=lm_head)


@dataclass(frozen=True)
class Shard:
    """This process's place in the tensor-parallel group (the default torch.distributed group)."""

    rank: int
    size: int

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `partial`, in place."""
        dist.all_reduce(partial)
        return partial

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's LM-head shard [T, V/N] side by side, the padding cut: [T, vocab_size]."""
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits)
        return torch.cat(parts, dim=-1)[:, :vocab_size]


def init_process_group(store: dist.Store, rank: int, size: int, device: torch.device) -> dist.ProcessGroup:
    """Join the group (NCCL on CUDA, gloo on the host); return the gloo group rank 0 sends steps on, whose
    timeout is long enough for an engine with nothing to do."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=STEP_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
