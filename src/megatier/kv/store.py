"""The KV store interface every executor runs on: where a step's KV is, and how decode attention reads it.

Two stores implement it:
- `KVCache` (kv/pages.py): one HBM pool, logical page = physical page; attention is the executor's own
  kernel over it. The trivial store.
- `TieredKV` (kv/tiered.py): slices in HBM, pinned DRAM and disk; attention is computed where each slice
  lives and merged exactly; pages migrate by importance between steps.

A step goes: `plan = store.begin_step(batch, tables, lens)` (logical tables and context lengths as device
tensors the executor owns; the store places the pages about to be written in HBM and plans the step),
then per layer `store.layer_kv(plan, layer)` (where that layer's new K/V are written and, for a prompt
chunk, `store.context(plan, layer)` where its whole context can be read), `store.attend(plan, layer, q,
hbm_attention)` for decode rows, and finally `store.end_step(plan)` (importance, statistics, migrations).
Executors pass their own attention kernel as `hbm_attention`, so the trivial store costs nothing extra
and a tiered store reuses the same kernel for its HBM part. Inside a captured CUDA graph, everything
`layer_kv` and `attend` enqueue reads the plan's persistent buffers, which `begin_step` rewrites before
each replay; `plan.graph_key` changes whenever a different graph is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from megatier.executors.base import StepBatch
from megatier.kv.pages import PageAllocator


@dataclass
class LayerKV:
    """One layer's KV as the kernels address it: token t of row b is in pool[tables[b, t // page_size],
    layer], row t % page_size. `lens` [B] int32 bounds each row (for compact tables of a tier's pages:
    full pages first, at most one partial page last)."""

    pool: torch.Tensor  # [slots, layers, 2, kv_heads, page_size, head_dim]
    layer: int
    tables: torch.Tensor  # [B, W] int32
    lens: torch.Tensor  # [B] int32


# The executor's attention over one LayerKV: q [B, H, D] -> (out [B, H, D] in q's dtype, lse [B, H] fp32).
HbmAttention = Callable[[torch.Tensor, LayerKV], tuple[torch.Tensor, torch.Tensor]]


class StepPlan(Protocol):
    batch: StepBatch
    graph_key: tuple  # part of a captured graph's key: equal keys may replay the same graph


class KVStore(Protocol):
    allocator: PageAllocator  # the scheduler's logical page ids
    num_pages: int
    page_size: int
    device: torch.device
    dtype: torch.dtype
    tiered: bool

    def begin_step(self, batch: StepBatch, tables: torch.Tensor, lens: torch.Tensor) -> StepPlan: ...

    def layer_kv(self, plan: StepPlan, layer: int) -> LayerKV: ...

    def context(self, plan: StepPlan, layer: int, rows: list[int]) -> LayerKV: ...

    def attend(self, plan: StepPlan, layer: int, q: torch.Tensor, hbm_attention: HbmAttention) -> torch.Tensor: ...

    def end_step(self, plan: StepPlan) -> None: ...
