"""Where every KV page lives: an HBM pool, a pinned host-DRAM pool and a disk pool, each with a budget.

The engine's scheduler hands out *logical* page ids (the ids in its page tables); this module maps each
logical page to (tier, slot) and moves pages between tiers. A page is the unit of placement and of
transfer: all layers, K and V, one contiguous block (kv/pages.py), 0.5-2 MiB for real models, which is
large enough to use PCIe well; consecutive slots are coalesced into one copy.

Moves go between adjacent tiers and never block: HBM<->DRAM copies run on a side CUDA stream, DRAM<->disk
through a thread pool, and a page keeps being read from its old place until `poll` sees the copy done
and commits the new one. Only `make_room` (a new page needs an HBM slot and none is free) waits.
Each tier above the lowest keeps `reserve` slots free so migrations always have somewhere to land;
the logical capacity is the slots of all tiers minus those reserves.
"""

from __future__ import annotations

import contextlib
import heapq
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.kv.disk import DiskPool
from megatier.kv.pages import KVCache, PageAllocator

HBM, DRAM, DISK = 0, 1, 2
TIER_NAMES = ("hbm", "dram", "disk")
UNPLACED = -1


@dataclass
class _Move:
    page: int
    src: tuple[int, int]  # (tier, slot)
    dst: tuple[int, int]
    done: Callable[[], bool]
    wait: Callable[[], None]
    error: Callable[[], BaseException | None] = lambda: None
    cancelled: bool = False  # the page was freed while its copy was in flight


class _Slots:
    """Free slots of one tier, lowest first, so pages placed together get consecutive slots."""

    def __init__(self, n: int):
        self.free = list(range(n))
        self.total = n

    def take(self) -> int:
        return heapq.heappop(self.free)

    def give(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def __len__(self) -> int:
        return len(self.free)


class TieredKV:
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        hbm_bytes: int,
        dram_bytes: int = 0,
        disk_bytes: int = 0,
        disk_dir: str | Path | None = None,
        io_threads: int = 8,
    ):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.page_shape = (cfg.num_layers, 2, cfg.num_kv_heads, page_size, cfg.head_dim)
        self.page_bytes = int(np.prod(self.page_shape)) * dtype.itemsize
        self.slice_bytes = self.page_bytes // cfg.num_layers
        counts = [int(b) // self.page_bytes for b in (hbm_bytes, dram_bytes, disk_bytes)]
        if counts[DISK] and not counts[DRAM]:
            raise MegatierError("kv_disk needs kv_dram: disk pages are staged through host memory")
        if counts[HBM] < 2:
            raise MegatierError(
                f"kv_hbm holds {counts[HBM]} pages of {self.page_bytes} bytes; it needs at least 2: raise kv_hbm"
            )
        self.hbm = KVCache.allocate(cfg, counts[HBM], page_size, dtype, device)
        self.dram = torch.empty((counts[DRAM], *self.page_shape), dtype=dtype, pin_memory=device.type == "cuda")
        self._own_dir = counts[DISK] > 0 and disk_dir is None
        if counts[DISK]:
            directory = Path(disk_dir) if disk_dir else Path(tempfile.mkdtemp(prefix="megatier-kv-"))
            self.disk: DiskPool | None = DiskPool(directory, counts[DISK], cfg.num_layers, self.slice_bytes)
        else:
            self.disk = None
        self.slots = [_Slots(n) for n in counts]
        lowest = max(t for t in (HBM, DRAM, DISK) if counts[t])
        self.reserve = [0 if t >= lowest else max(1, min(64, counts[t] // 32)) for t in (HBM, DRAM, DISK)]
        self.num_pages = sum(counts) - sum(self.reserve)
        self.tier = np.full(self.num_pages, UNPLACED, dtype=np.int8)
        self.slot = np.full(self.num_pages, -1, dtype=np.int32)
        # Placement priority of every page (importance, plus a bonus for sinks and the recent window),
        # set by the locality module; pages written in the current step are never moved.
        self.priority = np.zeros(self.num_pages, dtype=np.float32)
        self.writing: set[int] = set()
        self.inflight: dict[int, _Move] = {}
        self._cancelled: list[_Move] = []
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="megatier-kv-io")
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.moved_bytes = [[0] * 3 for _ in range(3)]  # [src tier][dst tier]
        self.allocator = TieredPageAllocator(self)

    # -- bookkeeping -------------------------------------------------------------------------------------

    def pages_in(self, tier: int) -> np.ndarray:
        return np.flatnonzero(self.tier == tier)

    def used(self, tier: int) -> int:
        return self.slots[tier].total - len(self.slots[tier])

    def capacity(self, tier: int) -> int:
        return self.slots[tier].total

    def assign(self, page: int, tier: int) -> int:
        """Give an unplaced page a free slot of `tier` (no data is copied)."""
        if self.tier[page] != UNPLACED:
            raise ValueError(f"page {page} is already placed")
        if not self.slots[tier]:
            raise MegatierError(f"the {TIER_NAMES[tier]} KV tier is full")
        self.tier[page], self.slot[page] = tier, self.slots[tier].take()
        return int(self.slot[page])

    def release(self, pages: list[int]) -> None:
        """Free the slots of pages the scheduler no longer uses."""
        for page in pages:
            move = self.inflight.pop(page, None)
            if move is not None:
                move.cancelled = True
                self._cancelled.append(move)
            elif self.tier[page] != UNPLACED:
                self._free_slot(int(self.tier[page]), int(self.slot[page]))
            self.tier[page], self.slot[page] = UNPLACED, -1

    def _free_slot(self, tier: int, slot: int) -> None:
        self.slots[tier].give(slot)
        if tier == DISK:
            self.disk.remove(slot)

    def close(self) -> None:
        self.wait_all()
        self.io.shutdown()
        if self._own_dir and self.disk is not None:
            shutil.rmtree(self.disk.directory, ignore_errors=True)

    # -- moving pages ------------------------------------------------------------------------------------

    def move(self, pages: list[int], dst: int) -> int:
        """Start moving `pages` (each in a tier adjacent to `dst`, none in flight) to `dst`; returns bytes."""
        pairs: dict[int, list[tuple[int, int, int]]] = {}
        for page in pages:
            src = int(self.tier[page])
            if abs(src - dst) != 1 or page in self.inflight:
                raise ValueError(f"page {page} cannot move from tier {src} to tier {dst}")
            pairs.setdefault(src, []).append((page, int(self.slot[page]), self.slots[dst].take()))
        for src, items in pairs.items():
            if DISK in (src, dst):
                self._move_disk(src, dst, items)
            else:
                self._move_pcie(src, dst, items)
            self.moved_bytes[src][dst] += len(items) * self.page_bytes
        return len(pages) * self.page_bytes

    def _move_pcie(self, src: int, dst: int, items: list[tuple[int, int, int]]) -> None:
        pools = {HBM: self.hbm.kv, DRAM: self.dram}
        items.sort(key=lambda it: it[1])
        runs: list[tuple[int, int, int]] = []  # (src slot, dst slot, length): one copy each
        for _, s, d in items:
            if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((s, d, 1))
        if self.copy_stream is None:
            for s, d, n in runs:
                pools[dst][d : d + n].copy_(pools[src][s : s + n])
            done, wait = (lambda: True), (lambda: None)
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # writes to the source are done
            with torch.cuda.stream(self.copy_stream):
                for s, d, n in runs:
                    pools[dst][d : d + n].copy_(pools[src][s : s + n], non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            done, wait = event.query, event.synchronize
        for page, s, d in items:
            self.inflight[page] = _Move(page, (src, s), (dst, d), done, wait)

    def _move_disk(self, src: int, dst: int, items: list[tuple[int, int, int]]) -> None:
        for page, s, d in items:
            host = self._host_bytes(d if dst == DRAM else s)
            if dst == DISK:
                future: Future = self.io.submit(self.disk.write, d, host)
            else:
                future = self.io.submit(self.disk.read, s, host)
            self.inflight[page] = _Move(page, (src, s), (dst, d), future.done, future.result, future.exception)

    def _host_bytes(self, dram_slot: int) -> np.ndarray:
        return self.dram[dram_slot].view(-1).view(torch.uint8).numpy()

    def poll(self) -> None:
        """Commit every finished move; a failed disk read or write raises its error here."""
        for move in [m for m in self._cancelled if m.done()]:
            self._cancelled.remove(move)
            self._free_slot(*move.src)
            self._free_slot(*move.dst)
        for page, move in list(self.inflight.items()):
            if not move.done():
                continue
            del self.inflight[page]
            error = move.error()
            if error is not None:
                self.slots[move.dst[0]].give(move.dst[1])
                raise error
            self.tier[page], self.slot[page] = move.dst
            self._free_slot(*move.src)

    def wait_all(self) -> None:
        for move in [*self.inflight.values(), *self._cancelled]:
            with contextlib.suppress(Exception):  # a failed move raises from poll below
                move.wait()
        self.poll()

    def make_room(self, tier: int, n: int) -> None:
        """Make `n` slots of `tier` free now, demoting its least important movable pages (waits)."""
        if len(self.slots[tier]) >= n:
            return
        if tier == len(self.slots) - 1 or self.slots[tier + 1].total == 0:
            raise MegatierError(f"the {TIER_NAMES[tier]} KV tier is full and there is no lower tier to spill to")
        self.wait_all()
        need = n - len(self.slots[tier])
        victims = [p for p in self.pages_in(tier) if p not in self.writing]
        if len(victims) < need:
            raise MegatierError(
                f"the {TIER_NAMES[tier]} KV tier has {self.slots[tier].total} pages and this step writes to "
                f"{len(self.writing)} of them: raise kv_hbm or lower max_num_batched_tokens / max_num_seqs"
            )
        victims = sorted(victims, key=lambda p: self.priority[p])[:need]
        self.make_room(tier + 1, need)
        self.move(victims, tier + 1)
        self.wait_all()

    def place_new(self, pages: list[int]) -> list[int]:
        """Give HBM slots to the unplaced pages among `pages` (pages about to be written); returns them."""
        new = [p for p in pages if self.tier[p] == UNPLACED]
        self.make_room(HBM, len(new))
        for p in new:
            self.assign(p, HBM)
        return new

    def promote_now(self, pages: list[int]) -> None:
        """Bring pages to HBM before they are written (e.g. a sequence resumed after its tail was demoted)."""
        for page in pages:
            while self.tier[page] != HBM:
                if page in self.inflight:
                    self.wait_all()
                    continue
                up = int(self.tier[page]) - 1
                self.make_room(up, 1)
                self.move([page], up)
                self.wait_all()

    # -- reading pages -----------------------------------------------------------------------------------

    def read_disk_slices(self, slots: list[int], layer: int, out: torch.Tensor) -> None:
        """Read layer `layer` of disk slots into out[i] ([n, 2, Hkv, P, D] host tensor), in parallel, verified."""
        views = [out[i].view(-1).view(torch.uint8).numpy() for i in range(len(slots))]
        for f in [self.io.submit(self.disk.read, s, v, layer) for s, v in zip(slots, views, strict=True)]:
            f.result()

    def gather_layer(self, pages: list[int], layer: int) -> torch.Tensor:
        """Layer `layer` of `pages` from whatever tier holds them: [n, 2, Hkv, P, D] on the HBM device."""
        out = torch.empty((len(pages), *self.page_shape[1:]), dtype=self.dtype, device=self.device)
        tiers, slots = self.tier[pages], self.slot[pages]
        for tier in (HBM, DRAM, DISK):
            idx = np.flatnonzero(tiers == tier)
            if len(idx) == 0:
                continue
            if tier == HBM:
                part = self.hbm.kv[torch.from_numpy(slots[idx].astype(np.int64)).to(self.device), layer]
            elif tier == DRAM:
                part = self.dram[torch.from_numpy(slots[idx].astype(np.int64)), layer]
            else:
                part = torch.empty((len(idx), *self.page_shape[1:]), dtype=self.dtype)
                self.read_disk_slices(slots[idx].tolist(), layer, part)
            out[torch.from_numpy(idx).to(self.device)] = part.to(self.device)
        return out

    def read_page(self, page: int) -> torch.Tensor:
        """A whole page's bytes from its tier, as a host tensor (for checks and tests)."""
        tier, slot = int(self.tier[page]), int(self.slot[page])
        if tier == HBM:
            return self.hbm.kv[slot].cpu()
        if tier == DRAM:
            return self.dram[slot].clone()
        out = torch.empty(self.page_shape, dtype=self.dtype)
        self.disk.read(slot, out.view(-1).view(torch.uint8).numpy())
        return out


class TieredPageAllocator(PageAllocator):
    """The scheduler's allocator of logical pages; freeing a page also frees its slot in whatever tier."""

    def __init__(self, tiers: TieredKV):
        super().__init__(tiers.num_pages)
        self.tiers = tiers

    def free(self, pages: list[int]) -> None:
        self.tiers.release(pages)
        super().free(pages)
