"""The paged KV cache: one storage layout, a page allocator, and per-sequence page tables.

Storage is one tensor `kv[page, layer, k_or_v, kv_head, token_in_page, head_dim]`. A page holds
`page_size` consecutive tokens of one sequence for every layer, K and V: so one page is the unit that
moves between memory tiers as a single contiguous block, while within a page each (layer, K|V, head)
slice is `page_size * head_dim` contiguous elements, the run an attention kernel streams.
Token at position p of a sequence lives in page `table[p // page_size]`, row `p % page_size`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from megatier.config import ModelConfig


@dataclass
class KVCache:
    kv: torch.Tensor  # [num_pages, num_layers, 2, num_kv_heads, page_size, head_dim]

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

    def page_bytes(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()


class PageAllocator:
    """Hands out page ids of one pool; freed pages are reused first-in first-out."""

    def __init__(self, num_pages: int):
        self._free: deque[int] = deque(range(num_pages))
        self.num_pages = num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache full: {n} pages requested, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)


@dataclass
class PageTable:
    """The pages of one sequence, in order; `num_tokens` of them hold written KV."""

    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def pages_needed(self, total_tokens: int, page_size: int) -> int:
        return max(0, -(-total_tokens // page_size) - len(self.pages))


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def block_table_tensor(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[B, max_pages] int32, padded with page 0 (never read: lengths bound every access)."""
    width = max((len(t) for t in tables), default=0) or 1
    out = torch.zeros((len(tables), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out.to(device)


def slot_mapping(tables: list[list[int]], positions: list[range], page_size: int) -> tuple[list[int], list[int]]:
    """(page, row) for every new token: sequence i writes positions `positions[i]`."""
    pages, rows = [], []
    for table, span in zip(tables, positions, strict=True):
        for p in span:
            pages.append(table[p // page_size])
            rows.append(p % page_size)
    return pages, rows
