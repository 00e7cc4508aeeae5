"""Context locality: which slices matter, which a sparse step reads, and where each slice should live.

Everything here is per (page, layer) slice: attention picks pages per layer, and the pages that matter
differ by layer, so importance, selection and placement all keep a layer axis.
- Key metadata (Quest): channel-wise min and max of every slice's keys, per kv head, kept on the
  executor's device for every page of every tier (1/page_size of the KV bytes). A page is scored for a
  query without reading it: the upper bound of q.k over the page is q+ . max + q- . min, two matmuls.
- Importance (after PAM): I <- 0.6 * S + 0.4 * I_prev per slice, S = 1 if the layer's selection read the
  page this step, else 0 (see Importance for why selection rather than estimated attention mass).
- Sparse selection: per (sequence, layer) the attention sinks, the recent window and the top-scored pages
  up to a token budget (a fraction of the context); all heads of the layer read the same pages.
- Placement: each step the scheduler swaps a slice into a faster tier when that tier holds a less
  important one (disk<->DRAM first, then DRAM<->HBM), under a byte budget, with hysteresis so slices do
  not ping-pong; sinks and the recent window get a priority bonus, so they stay in HBM.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatier.kernels.page_scores import page_scores
from megatier.kv.tiers import DRAM, HBM, TieredPools

EMA = 0.6  # weight of the newest step (PAM's lambda)
PIN_BONUS = 1e6  # priority of sinks and the recent window: above any importance
HYSTERESIS = 1.25  # a page displaces another only if it is this much more important
# Sparse selection adds this many logits to the score (an upper bound of q.k) of a slice already in HBM,
# so a DRAM slice displaces a resident one only when its bound is clearly higher. On the real SmolLM2 at
# a 1/8 budget a third of each step's selection changed from the step before, which capped the HBM hit
# rate near 0.63 however placement followed it; at 4 logits the hit rate is 0.91 and the selection still
# holds the same share of the exact attention mass (0.912 against 0.915): the bounds are loose, so pages
# near the threshold were interchangeable (docs/PERF.md, nineteenth session).
RESIDENCY_BONUS = 4.0


class PageMeta:
    """Per-page key min/max on the executor's device: [pages + 1, layers, kv_heads, 2 (min|max), head_dim].
    The last row is a sink for padding rows of a captured decode step (`spare`): never scored."""

    def __init__(self, num_pages: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.minmax = torch.empty((num_pages + 1, num_layers, num_kv_heads, 2, head_dim), dtype=dtype, device=device)
        self.spare = num_pages

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

    def set_from_keys(
        self, pages: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, layer: int | None = None
    ) -> None:
        """Metadata of whole pages from their keys [n, L, Hkv, P, D] (or, for one `layer`, [n, Hkv, P, D]),
        rows [n] valid rows each."""
        valid = torch.arange(keys.shape[-2], device=keys.device)[None, :] < rows[:, None]
        valid = valid.view(len(rows), *([1] * (keys.dim() - 3)), keys.shape[-2], 1)
        target = (pages, slice(None)) if layer is None else (pages, layer)
        self.minmax[(*target, slice(None), 0)] = keys.masked_fill(~valid, float("inf")).amin(-2).to(self.minmax.dtype)
        self.minmax[(*target, slice(None), 1)] = keys.masked_fill(~valid, float("-inf")).amax(-2).to(self.minmax.dtype)

    def score(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, num_pages: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Page scores [B, W] for q [B, H, D] over tables [B, W] (logical ids; the first num_pages[b] of
        row b are real): the best upper bound of q.k over the page, over the layer's heads; others get
        -inf. On CUDA one kernel (kernels/page_scores.py); elsewhere the torch form below."""
        if q.is_cuda:
            return page_scores(q, self.minmax[:, layer], tables, num_pages, scale)
        valid = torch.arange(tables.shape[1], device=q.device)[None, :] < num_pages[:, None]
        meta = self.minmax[tables, layer].float()  # [B, W, Hkv, 2, D]
        b, heads, d = q.shape
        qg = q.float().view(b, meta.shape[2], heads // meta.shape[2], d)
        bound = torch.einsum("bhgd,bphd->bhgp", qg.clamp(min=0), meta[:, :, :, 1])
        bound += torch.einsum("bhgd,bphd->bhgp", qg.clamp(max=0), meta[:, :, :, 0])
        bound = (bound * scale).masked_fill(~valid[:, None, None, :], float("-inf"))
        return bound.amax(dim=(1, 2))


def select_pages(
    scores: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor, k_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the pages each row reads: the forced ones first, then the best-scored, budget[b] in all.

    Returns (columns [B, k_max], valid [B, k_max])."""
    key = scores.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    cols = key.topk(k_max, dim=1).indices
    return cols, torch.arange(k_max, device=cols.device)[None, :] < budget[:, None]


def sparse_budget_pages(num_pages: np.ndarray, fraction: float, forced: np.ndarray | int) -> np.ndarray:
    """Pages read per sequence: `fraction` of its pages, at least its forced pages, at most all."""
    want = np.ceil(num_pages * fraction).astype(np.int64)
    return np.minimum(num_pages, np.maximum(want, forced))


class Importance:
    """EMA of how often each slice is selected, on the executor's device: value [pages, layers].

    What placement must predict is which slices the next steps select, so the signal is selection
    itself: S = 1 for a slice read this step, 0 for one its sequence had but did not read. (PAM weighs
    by estimated attention mass instead; on the real SmolLM2 that kept the selected slices in HBM 55%
    of the time at a 1/8 budget, since mass averaged over heads ranks pages differently from the
    max-over-heads bound that selects them: docs/PERF.md.)"""

    def __init__(self, num_pages: int, num_layers: int, device: torch.device):
        self.value = torch.zeros((num_pages + 1, num_layers), dtype=torch.float32, device=device)  # + spare row
        self._step = torch.zeros_like(self.value)
        self._seen = torch.zeros(num_pages + 1, dtype=torch.bool, device=device)

    def candidates(self, tables: torch.Tensor) -> None:
        """This step's candidate pages, tables [B, W] (padding pointing at the spare row): the same in
        every layer, so marked once a step (no boolean indexing: no host sync)."""
        self._seen.index_fill_(0, tables.flatten(), True)

    def add(self, layer: int, chosen_pages: torch.Tensor, chosen: torch.Tensor) -> None:
        """One layer's selection: `chosen_pages` [B, K] (where `chosen`) were read."""
        self._step[:, layer].index_add_(0, chosen_pages.flatten(), chosen.flatten().float())

    def end_step(self) -> None:
        blended = EMA * self._step + (1 - EMA) * self.value
        self.value.copy_(torch.where(self._seen[:, None], blended, self.value))
        self._step.zero_()
        self._seen.zero_()

    def reset(self, pages: torch.Tensor) -> None:
        self.value[pages] = 0.0


def plan_migrations(pools: TieredPools, byte_budget: int) -> int:
    """Start the moves this step's slice priorities call for, within `byte_budget`; returns the bytes.

    Per pair of adjacent tiers (DRAM/disk first, then HBM/DRAM): first restore the faster tier's free
    reserve by demoting its least important slices, then promote into any room beyond the reserve, then,
    while the most important slice of the slower tier beats the least important slice of the faster one
    by HYSTERESIS, swap them: as two moves while both tiers have a free slot, then, for HBM/DRAM, in
    place (TieredPools.swap). The host never waits. Array operations throughout: a step plans thousands
    of slices (a Python loop over them cost ~20 ms a step)."""
    started = 0
    prio, tier = pools.priority.reshape(-1), pools.tier.reshape(-1)
    busy = np.repeat(pools.writing, pools.num_layers) | pools.moving
    for upper in (DRAM, HBM):
        lower = upper + 1
        if pools.capacity(lower) == 0 or pools.capacity(upper) == 0:
            continue
        free_up, free_low = len(pools.slots[upper]), len(pools.slots[lower])
        reserve = pools.reserve[upper]
        budget = (byte_budget - started) // pools.slice_bytes
        # Only the budget's worth of candidates at each end can move: partial sorts keep this O(slices).
        ups = _ends(np.flatnonzero((tier == upper) & ~busy), prio, budget + 1)  # least important first
        movable_down = (tier == lower) & ~busy
        if free_up <= reserve:  # no room to spare: only a slice that beats some upper one by the margin moves
            movable_down &= prio > 1e-6
        downs = _ends(np.flatnonzero(movable_down), -prio, budget + 1)  # most important first
        # Restore the reserve (new pages of the next steps land in the fastest tier), then fill the room
        # beyond it without displacing anyone.
        n_demote = max(0, min(reserve - free_up, len(ups), free_low, budget))
        budget -= n_demote
        n_promote = max(0, min(free_up - reserve, len(downs), budget))
        budget, free_up, free_low = budget - n_promote, free_up - n_promote, free_low - n_demote
        # Pairs (least important up, most important down) in order; the gain only falls along them.
        cand_up, cand_down = ups[n_demote:], downs[n_promote:]
        m = min(len(cand_up), len(cand_down), budget // 2)
        better = prio[cand_down[:m]] > HYSTERESIS * prio[cand_up[:m]] + 1e-6
        pairs = int(np.argmin(better)) if not better.all() else m
        moved = min(pairs, max(0, free_up), max(0, free_low))
        swapped = pairs - moved if upper == HBM else 0
        demote = np.concatenate((ups[:n_demote], cand_up[:moved]))
        promote = np.concatenate((downs[:n_promote], cand_down[:moved]))
        swap_up, swap_low = cand_up[moved : moved + swapped], cand_down[moved : moved + swapped]
        started += pools.move(demote, lower)
        started += pools.move(promote, upper)
        started += pools.swap(swap_up, swap_low)
        for done in (demote, promote, swap_up, swap_low):
            busy[done] = True
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
