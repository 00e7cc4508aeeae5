"""The paged KV cache: one storage layout, a page allocator, and per-sequence page tables.

Storage is one tensor `kv[page, layer, k_or_v, kv_head, token_in_page, head_dim]`. A page holds
`page_size` consecutive tokens of one sequence for every layer, K and V: so one page is the unit that
moves between memory tiers as a single contiguous block, while within a page each (layer, K|V, head)
slice is `page_size * head_dim` contiguous elements, the run an attention kernel streams.
Token at position p of a sequence lives in page `table[p // page_size]`, row `p % page_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from megatier.config import ModelConfig

if TYPE_CHECKING:
    from megatier.executors.base import StepBatch
    from megatier.kv.store import HbmAttention, LayerKV


@dataclass
class HbmPlan:
    """A step over the plain cache: the executor's own tables and lengths, nothing else."""

    batch: StepBatch
    tables: torch.Tensor
    lens: torch.Tensor
    graph_key: tuple = ()


@dataclass
class KVCache:
    """The plain KV store: every page in one device pool, logical page ids are its indices (kv/store.py)."""

    kv: torch.Tensor  # [num_pages, num_layers, 2, num_kv_heads, page_size, head_dim]
    tiered = False

    def __post_init__(self) -> None:
        self.allocator = PageAllocator(self.kv.shape[0])

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        shape = (num_pages, cfg.num_layers, 2, cfg.num_kv_heads, page_size, cfg.head_dim)
        # Uninitialized on purpose: every read is bounded by sequence lengths, and fast kernels are
        # tested against garbage beyond them. On the host this also leaves untouched memory unmapped.
        return cls(torch.empty(shape, dtype=dtype, device=device))

    @property
    def num_pages(self) -> int:
        return self.kv.shape[0]

    @property
    def page_size(self) -> int:
        return self.kv.shape[4]

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def page_bytes(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

    # -- the KVStore interface (kv/store.py): nothing to plan, the executor's kernels do it all --------

    def begin_step(self, batch: StepBatch, tables: torch.Tensor, lens: torch.Tensor) -> HbmPlan:
        return HbmPlan(batch, tables, lens)

    def layer_kv(self, plan: HbmPlan, layer: int) -> LayerKV:
        from megatier.kv.store import LayerKV

        return LayerKV(self.kv, layer, plan.tables, plan.lens)

    def context(self, plan: HbmPlan, layer: int) -> LayerKV:
        return self.layer_kv(plan, layer)

    def attend(self, plan: HbmPlan, layer: int, q: torch.Tensor, hbm_attention: HbmAttention) -> torch.Tensor:
        return hbm_attention(q, self.layer_kv(plan, layer))[0]

    def end_step(self, plan: HbmPlan) -> None:
        pass


class PageAllocator:
    """Hands out page ids of one pool, lowest first on a fresh pool; freed pages are reused most recently
    freed first, so the pages in use stay few and warm (memory the host never touched stays unmapped)."""

    def __init__(self, num_pages: int):
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # a stack: the next page is at the end
        self.num_pages = num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache full: {n} pages requested, {len(self._free)} free")
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return taken

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


@dataclass
class PageTable:
    """The pages of one sequence, in order (the sequence's num_computed says how many tokens hold KV)."""

    pages: list[int] = field(default_factory=list)

    def pages_needed(self, total_tokens: int, page_size: int) -> int:
        return max(0, -(-total_tokens // page_size) - len(self.pages))


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def block_table_tensor(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[B, max_pages] int32, padded with page 0 (never read: lengths bound every access)."""
    width = max((len(t) for t in tables), default=0) or 1
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t  # numpy reads a list ~3x faster than torch.tensor does (a decode step's tables)
    return torch.from_numpy(out).to(device)


def slot_mapping(tables: list[list[int]], positions: list[range], page_size: int) -> tuple[list[int], list[int]]:
    """(page, row) for every new token: sequence i writes positions `positions[i]`."""
    pages, rows = [], []
    for table, span in zip(tables, positions, strict=True):
        for p in span:
            pages.append(table[p // page_size])
            rows.append(p % page_size)
    return pages, rows
