"""Context locality: which pages matter, which a sparse step reads, and where each page should live.

- Key metadata (Quest): channel-wise min and max of every page's keys, per layer and kv head, kept on the
  executor's device for every page of every tier (1/(2*page_size) of the KV bytes). A page is scored
  for a query without reading it: the upper bound of q.k over the page is q+ . max + q- . min, two
  matmuls.
- Importance (PAM): I <- 0.6 * S + 0.4 * I_prev per page, S the attention mass the page was estimated to
  receive this step (softmax of the page bounds, averaged over heads and layers), relative to a uniform
  share so pages of long and short sequences compare.
- Sparse selection: per (sequence, layer) the attention sinks, the recent window and the top-scored pages
  up to a token budget (a fraction of the context); all heads of the layer read the same pages.
- Placement: each step the scheduler swaps a page into a faster tier when that tier holds a less
  important one (disk<->DRAM first, then DRAM<->HBM), under a byte budget, with hysteresis so pages do
  not ping-pong; sinks and the recent window get a priority bonus, so they stay in HBM.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatier.kv.tiers import DRAM, HBM, TieredKV

EMA = 0.6  # weight of the newest step (PAM's lambda)
PIN_BONUS = 1e6  # priority of sinks and the recent window: above any importance
HYSTERESIS = 1.25  # a page displaces another only if it is this much more important


class PageMeta:
    """Per-page key min/max on the executor's device: [pages, layers, kv_heads, 2 (min|max), head_dim]."""

    def __init__(self, num_pages: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.minmax = torch.empty((num_pages, num_layers, num_kv_heads, 2, head_dim), dtype=dtype, device=device)

    def reset(self, pages: torch.Tensor) -> None:
        """Forget fresh pages' old keys: min = +inf, max = -inf, so the first write sets both."""
        self.minmax[pages, :, :, 0] = float("inf")
        self.minmax[pages, :, :, 1] = float("-inf")

    def update(self, layer: int, pages: torch.Tensor, k: torch.Tensor) -> None:
        """Fold keys k [T, Hkv, D] written to `pages` [T] (logical ids) into the layer's min/max."""
        meta, k = self.minmax[:, layer], k.to(self.minmax.dtype)
        index = pages[:, None, None].expand_as(k)
        meta[:, :, 0].scatter_reduce_(0, index, k, "amin")
        meta[:, :, 1].scatter_reduce_(0, index, k, "amax")

    def set_from_keys(self, pages: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Metadata of whole pages from their keys [n, L, Hkv, P, D], rows [n] valid rows each."""
        valid = (torch.arange(keys.shape[3], device=keys.device)[None, :] < rows[:, None])[:, None, None, :, None]
        self.minmax[pages, :, :, 0] = keys.masked_fill(~valid, float("inf")).amin(3).to(self.minmax.dtype)
        self.minmax[pages, :, :, 1] = keys.masked_fill(~valid, float("-inf")).amax(3).to(self.minmax.dtype)

    def score(self, layer: int, q: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor, scale: float):
        """Page scores for q [B, H, D] over tables [B, P] (logical ids; `valid` marks real entries).

        Returns (select [B, P]: the best bound over the layer's heads, for top-k; mass [B, P]: the
        estimated attention share of each page, averaged over heads). Invalid entries score -inf / 0."""
        meta = self.minmax[tables, layer].float()  # [B, P, Hkv, 2, D]
        b, heads, d = q.shape
        qg = q.float().view(b, meta.shape[2], heads // meta.shape[2], d)
        bound = torch.einsum("bhgd,bphd->bhgp", qg.clamp(min=0), meta[:, :, :, 1])
        bound += torch.einsum("bhgd,bphd->bhgp", qg.clamp(max=0), meta[:, :, :, 0])
        bound = (bound * scale).masked_fill(~valid[:, None, None, :], float("-inf"))
        mass = torch.softmax(bound, dim=-1).nan_to_num(0.0).mean(dim=(1, 2))
        return bound.amax(dim=(1, 2)), mass


def select_pages(
    scores: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor, k_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the pages each row reads: the forced ones first, then the best-scored, budget[b] in all.

    Returns (columns [B, k_max], valid [B, k_max])."""
    key = scores.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    cols = key.topk(k_max, dim=1).indices
    return cols, torch.arange(k_max, device=cols.device)[None, :] < budget[:, None]


def sparse_budget_pages(num_pages: np.ndarray, fraction: float, forced: np.ndarray) -> np.ndarray:
    """Pages read per sequence: `fraction` of its pages, at least its forced pages, at most all."""
    want = np.ceil(num_pages * fraction).astype(np.int64)
    return np.minimum(num_pages, np.maximum(want, forced))


class Importance:
    """EMA of per-page attention mass on the executor's device."""

    def __init__(self, num_pages: int, num_layers: int, device: torch.device):
        self.value = torch.zeros(num_pages, dtype=torch.float32, device=device)
        self._step = torch.zeros_like(self.value)
        self._count = torch.zeros_like(self.value)
        self.num_layers = num_layers

    def add(self, tables: torch.Tensor, valid: torch.Tensor, mass: torch.Tensor, num_pages: torch.Tensor) -> None:
        """Accumulate one layer's mass; relative to a uniform share (1 / pages of the sequence). Padding
        entries add zero (no boolean indexing: that would make the host wait for the GPU)."""
        rel = mass * num_pages[:, None].float() * valid
        self._step.index_add_(0, tables.flatten(), rel.flatten())
        self._count.index_add_(0, tables.flatten(), valid.flatten().float())

    def end_step(self) -> None:
        seen = self._count > 0
        update = EMA * self._step / self.num_layers + (1 - EMA) * self.value
        self.value = torch.where(seen, update, self.value)
        self._step.zero_()
        self._count.zero_()

    def reset(self, pages: torch.Tensor) -> None:
        self.value[pages] = 0.0


def plan_migrations(tiers: TieredKV, byte_budget: int) -> int:
    """Start the moves this step's priorities call for, within `byte_budget`; returns the bytes started.

    Per pair of adjacent tiers (DRAM/disk first, then HBM/DRAM): first restore the faster tier's free
    reserve by demoting its least important pages, then, while the most important page of the slower
    tier beats the least important page of the faster one by HYSTERESIS, swap them. Nothing waits."""
    started = 0
    prio = tiers.priority
    busy = np.zeros(tiers.num_pages, dtype=bool)
    busy[list(tiers.inflight) + list(tiers.writing)] = True
    for upper in (DRAM, HBM):
        lower = upper + 1
        if tiers.capacity(lower) == 0 or tiers.capacity(upper) == 0:
            continue
        free_up, free_low = len(tiers.slots[upper]), len(tiers.slots[lower])
        budget_pages = (byte_budget - started) // tiers.page_bytes
        # Only the budget's worth of candidates at each end can move: partial sorts keep this O(pages).
        ups = _ends(np.flatnonzero((tiers.tier == upper) & ~busy), prio, budget_pages + 1)  # least important
        downs = _ends(np.flatnonzero((tiers.tier == lower) & ~busy), -prio, budget_pages + 1)  # most important
        demote, promote, u = [], [], 0
        # Restore the reserve: new pages of the next steps land in the fastest tier.
        while free_up + len(demote) < tiers.reserve[upper] and u < len(ups) and free_low > 0 and budget_pages > 0:
            demote.append(int(ups[u]))
            u, free_low, budget_pages = u + 1, free_low - 1, budget_pages - 1
        for page in downs:
            if budget_pages <= 0 or free_up == 0:
                break
            if free_up > tiers.reserve[upper]:  # room to spare: promote without displacing anyone
                promote.append(int(page))
                free_up, budget_pages = free_up - 1, budget_pages - 1
                continue
            if u >= len(ups) or free_low == 0 or budget_pages < 2 or prio[page] <= HYSTERESIS * prio[ups[u]] + 1e-6:
                break
            demote.append(int(ups[u]))
            promote.append(int(page))
            u, free_up, free_low, budget_pages = u + 1, free_up - 1, free_low - 1, budget_pages - 2
        if demote:
            started += tiers.move(demote, lower)
        if promote:
            started += tiers.move(promote, upper)
        busy[demote + promote] = True
    return started


def _ends(pages: np.ndarray, key: np.ndarray, k: int) -> np.ndarray:
    """The k pages with the smallest key, in increasing key order."""
    if len(pages) > k:
        pages = pages[np.argpartition(key[pages], k)[:k]]
    return pages[np.argsort(key[pages], kind="stable")]


def forced_columns(num_pages: np.ndarray, width: int, sink_pages: int, recent_pages: int) -> np.ndarray:
    """[B, width] bool: the sink pages and the recent-window pages of each sequence's page table."""
    cols = np.arange(width)[None, :]
    n = num_pages[:, None]
    return (cols < np.minimum(sink_pages, n)) | ((cols >= n - recent_pages) & (cols < n))


def recent_pages_for(window_tokens: int, page_size: int) -> int:
    """Pages that cover the last `window_tokens` tokens wherever the sequence ends in its last page."""
    return math.ceil(window_tokens / page_size) + 1
