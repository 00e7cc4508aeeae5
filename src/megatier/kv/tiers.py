"""Where every KV slice lives: an HBM pool, a pinned host-DRAM pool and a disk pool, each with a budget.

The scheduler hands out *logical* page ids; a page holds page_size tokens of one sequence, every layer.
Placement is finer: each (page, layer) *slice* (K and V of one layer, 2 * kv_heads * page_size * head_dim
elements) has its own (tier, slot), because attention selects pages per layer and the pages that matter
differ by layer; a page moving with all its layers would make HBM hold the union of every layer's choice.
Each pool is [slots, 1, 2, kv_heads, page_size, head_dim]: the layout of a one-layer KV cache, so the
attention and RoPE kernels read and write it unchanged, given per-layer tables of slots.

Moves go between adjacent tiers and never block the host: HBM<->DRAM copies run on a side CUDA stream
(one kernel launch for any number of scattered slices, kernels/copy_slices.py), DRAM<->disk through a
thread pool, and a slice keeps being read from its old place until `poll` sees the copy done and commits
the new one. Only `make_room` (written pages need HBM slots and none are free) waits. Each tier above
the lowest keeps `reserve` slots free so moves always have somewhere to land; the logical capacity is the
slots of all tiers less those reserves, in whole pages. A move holds a free slot until the next step
commits it, so the reserve caps the moves a step can start; `swap` exchanges an HBM slice and a DRAM
slice in place instead (on the compute stream, between steps: no free slot, committed at once), which is
how a migration budget larger than the reserve is spent.
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
from megatier.kernels.copy_slices import copy_slices, swap_slices
from megatier.kv.disk import DiskPool
from megatier.kv.host_memory import host_pool
from megatier.kv.pages import KVCache, PageAllocator

HBM, DRAM, DISK = 0, 1, 2
TIER_NAMES = ("hbm", "dram", "disk")
UNPLACED = -1


@dataclass(eq=False)  # a batch is one object in flight: compared by identity, not by its arrays
class _Moves:
    """Slices moving from one tier to another together (one copy kernel, or one disk I/O): held as
    arrays, since a step starts thousands of them."""

    flat: np.ndarray  # slice ids (page * layers + layer)
    src: int
    src_slots: np.ndarray
    dst: int
    dst_slots: np.ndarray
    done: Callable[[], bool]
    wait: Callable[[], None]
    error: Callable[[], BaseException | None] = lambda: None

    def split(self, mask: np.ndarray) -> _Moves:
        """The items where `mask` holds, as their own batch; this batch keeps the rest."""
        part = _Moves(self.flat[mask], self.src, self.src_slots[mask], self.dst, self.dst_slots[mask], self.done,
                      self.wait, self.error)  # fmt: skip
        self.flat, self.src_slots, self.dst_slots = self.flat[~mask], self.src_slots[~mask], self.dst_slots[~mask]
        return part


class _Slots:
    """Free slots of one tier, lowest first, so slices placed together get consecutive slots."""

    def __init__(self, n: int):
        self.free = list(range(n))
        self.total = n

    def take(self) -> int:
        return heapq.heappop(self.free)

    def give_many(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            heapq.heappush(self.free, slot)

    def __len__(self) -> int:
        return len(self.free)


class TieredPools:
    """The three pools, the (page, layer) -> (tier, slot) map, and the moves between tiers."""

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
        self.num_layers = layers = cfg.num_layers
        self.slice_shape = (1, 2, cfg.num_kv_heads, page_size, cfg.head_dim)
        self.slice_bytes = int(np.prod(self.slice_shape)) * dtype.itemsize
        self.page_bytes = self.slice_bytes * layers
        counts = [int(b) // self.slice_bytes for b in (hbm_bytes, dram_bytes, disk_bytes)]
        if counts[DISK] and not counts[DRAM]:
            raise MegatierError("kv_disk needs kv_dram: disk pages are staged through host memory")
        if counts[HBM] < 2 * layers:
            raise MegatierError(
                f"kv_hbm holds {counts[HBM] / layers:.1f} pages of {self.page_bytes} bytes; it needs at least 2:"
                " raise kv_hbm"
            )
        self.hbm = KVCache(torch.empty((counts[HBM], *self.slice_shape), dtype=dtype, device=device))
        pinned = device.type == "cuda"
        self.dram = host_pool((counts[DRAM], *self.slice_shape), dtype, pinned)
        self._own_dir = counts[DISK] > 0 and disk_dir is None
        self.disk: DiskPool | None = None
        if counts[DISK]:
            directory = Path(disk_dir) if disk_dir else Path(tempfile.mkdtemp(prefix="megatier-kv-"))
            self.disk = DiskPool(directory, counts[DISK], 1, self.slice_bytes)
        self.slots = [_Slots(n) for n in counts]
        lowest = max(t for t in (HBM, DRAM, DISK) if counts[t])
        # A reserve of whole pages' worth of slices, so a new page always finds room for every layer.
        self.reserve = [0 if t >= lowest else layers * max(1, min(64, counts[t] // layers // 32)) for t in range(3)]
        self.num_pages = (sum(counts) - sum(self.reserve)) // layers
        self.tier = np.full((self.num_pages, layers), UNPLACED, dtype=np.int8)
        self.slot = np.full((self.num_pages, layers), -1, dtype=np.int32)
        # Placement priority of every slice (importance, plus a bonus for sinks and the recent window),
        # set by the store each step; slices of pages written in the current step are never moved.
        self.priority = np.zeros((self.num_pages, layers), dtype=np.float32)
        self.writing = np.zeros(self.num_pages, dtype=bool)
        self.inflight: list[_Moves] = []
        self.moving = np.zeros(self.num_pages * layers, dtype=bool)  # by slice id: in an inflight batch
        self._cancelled: list[_Moves] = []
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="megatier-kv-io")
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.moved_bytes = np.zeros((3, 3), dtype=np.int64)  # [src tier][dst tier]
        self.version = 0  # bumped whenever the map changes (device copies of it must be refreshed)

    # -- bookkeeping -------------------------------------------------------------------------------------

    def used(self, tier: int) -> int:
        return self.slots[tier].total - len(self.slots[tier])

    def capacity(self, tier: int) -> int:
        return self.slots[tier].total

    def slices_in(self, tier: int) -> np.ndarray:
        """Flat ids (page * layers + layer) of the slices in `tier`."""
        return np.flatnonzero(self.tier.reshape(-1) == tier)

    def assign(self, page: int, layer: int, tier: int) -> int:
        """Give an unplaced slice a free slot of `tier` (no data is copied)."""
        if self.tier[page, layer] != UNPLACED:
            raise ValueError(f"slice ({page}, {layer}) is already placed")
        if not self.slots[tier]:
            raise MegatierError(f"the {TIER_NAMES[tier]} KV tier is full")
        self.tier[page, layer], self.slot[page, layer] = tier, self.slots[tier].take()
        self.version += 1
        return int(self.slot[page, layer])

    def release(self, pages: list[int]) -> None:
        """Free every slice of pages the scheduler no longer uses."""
        pages = np.asarray(pages, dtype=np.int64)
        flat = (pages[:, None] * self.num_layers + np.arange(self.num_layers)).reshape(-1)
        for batch in self.inflight:
            gone = np.isin(batch.flat, flat)
            if gone.any():
                self._cancelled.append(batch.split(gone))  # both ends are freed once the copy is done
        self.inflight = [b for b in self.inflight if len(b.flat)]
        settled = flat[~self.moving[flat]]
        tiers, slots = self.tier.reshape(-1)[settled], self.slot.reshape(-1)[settled]
        for t in (HBM, DRAM, DISK):
            self._free_slots(t, slots[tiers == t])
        self.moving[flat] = False
        self.tier[pages], self.slot[pages] = UNPLACED, -1
        self.priority[pages] = 0
        self.version += 1

    def _free_slots(self, tier: int, slots: np.ndarray) -> None:
        self.slots[tier].give_many(slots)
        if tier == DISK:
            for slot in slots.tolist():
                self.disk.remove(slot)

    def close(self) -> None:
        self.wait_all()
        self.io.shutdown()
        if self._own_dir and self.disk is not None:
            shutil.rmtree(self.disk.directory, ignore_errors=True)

    # -- moving slices -----------------------------------------------------------------------------------

    def move(self, flat: np.ndarray, dst: int) -> int:
        """Start moving slices `flat` (page * layers + layer; each in a tier adjacent to `dst`, none in
        flight) to `dst`; returns the bytes started."""
        flat = np.asarray(flat, dtype=np.int64)
        if len(flat) == 0:
            return 0
        tiers, slots = self.tier.reshape(-1)[flat], self.slot.reshape(-1)[flat]
        for src in np.unique(tiers):
            pick = tiers == src
            if abs(int(src) - dst) != 1 or self._any_in_flight(flat[pick]):
                raise ValueError(f"slices cannot move from tier {src} to tier {dst} (or are in flight)")
            take = self.slots[dst].take
            targets = np.array([take() for _ in range(int(pick.sum()))], dtype=np.int64)
            if DISK in (src, dst):
                self._move_disk(flat[pick], int(src), slots[pick], dst, targets)
            else:
                self._move_pcie(flat[pick], int(src), slots[pick], dst, targets)
            self.moving[flat[pick]] = True
            self.moved_bytes[src, dst] += len(targets) * self.slice_bytes
        return len(flat) * self.slice_bytes

    def swap(self, upper: list[int], lower: list[int]) -> int:
        """Exchange slices `upper` (each in HBM) and `lower` (each in DRAM) pair by pair, in place; returns
        the bytes moved (both ways).

        The copy runs on the current stream, after the step that read the old places and before the next,
        so the map changes at once and neither side needs a free slot."""
        up, low = np.asarray(upper, dtype=np.int64), np.asarray(lower, dtype=np.int64)
        if len(up) != len(low):
            raise ValueError("swap takes as many HBM slices as DRAM slices")
        if len(up) == 0:
            return 0
        tier, slot = self.tier.reshape(-1), self.slot.reshape(-1)
        if (tier[up] != HBM).any() or (tier[low] != DRAM).any() or self._any_in_flight(np.concatenate((up, low))):
            raise ValueError("swap exchanges HBM slices with DRAM slices, none of them in flight")
        hbm_slots, dram_slots = slot[up].copy(), slot[low].copy()
        idx = self._slot_pairs(hbm_slots, dram_slots)
        swap_slices(self.hbm.kv, self.dram, idx[0], idx[1])
        tier[up], slot[up] = DRAM, dram_slots
        tier[low], slot[low] = HBM, hbm_slots
        self.moved_bytes[HBM, DRAM] += len(up) * self.slice_bytes
        self.moved_bytes[DRAM, HBM] += len(up) * self.slice_bytes
        self.version += 1
        return 2 * len(up) * self.slice_bytes

    def _any_in_flight(self, flat: np.ndarray) -> bool:
        return bool(self.moving[flat].any())

    def _pool(self, tier: int) -> torch.Tensor:
        return self.hbm.kv if tier == HBM else self.dram

    def _slot_pairs(self, a: np.ndarray | list[int], b: np.ndarray | list[int]) -> torch.Tensor:
        """Slot lists a and b as int32 [2, n] for the slice kernels: on the device (uploaded on the current
        stream from pinned memory) when there is one."""
        idx = torch.from_numpy(np.stack((np.asarray(a), np.asarray(b))).astype(np.int32))
        return idx.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else idx

    def _move_pcie(self, flat: np.ndarray, src: int, src_slots: np.ndarray, dst: int, dst_slots: np.ndarray) -> None:
        if self.copy_stream is None:
            idx = self._slot_pairs(src_slots, dst_slots)
            copy_slices(self._pool(src), self._pool(dst), idx[0], idx[1])
            done, wait = (lambda: True), (lambda: None)
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # writes to the source are done
            with torch.cuda.stream(self.copy_stream):
                idx = self._slot_pairs(src_slots, dst_slots)
                copy_slices(self._pool(src), self._pool(dst), idx[0], idx[1])
                event = torch.cuda.Event()
                event.record()
            done, wait = event.query, event.synchronize
        self.inflight.append(_Moves(flat, src, src_slots, dst, dst_slots, done, wait))

    def _move_disk(self, flat: np.ndarray, src: int, src_slots: np.ndarray, dst: int, dst_slots: np.ndarray) -> None:
        """One batch per slice: each is its own read or write on the I/O threads, and fails alone."""
        for i, (s, d) in enumerate(zip(src_slots.tolist(), dst_slots.tolist(), strict=True)):
            host = self._host_bytes(d if dst == DRAM else s)
            if dst == DISK:
                future: Future = self.io.submit(self.disk.write, d, host)
            else:
                future = self.io.submit(self.disk.read, s, host)
            one = slice(i, i + 1)
            self.inflight.append(
                _Moves(
                    flat[one], src, src_slots[one], dst, dst_slots[one], future.done, future.result, future.exception
                )
            )

    def _host_bytes(self, dram_slot: int) -> np.ndarray:
        return self.dram[dram_slot].view(-1).view(torch.uint8).numpy()

    def poll(self) -> None:
        """Commit every finished move; a failed disk read or write raises its error here."""
        for batch in [b for b in self._cancelled if b.done()]:
            self._cancelled.remove(batch)
            self._free_slots(batch.src, batch.src_slots)
            self._free_slots(batch.dst, batch.dst_slots)
        finished = [b for b in self.inflight if b.done()]
        tier, slot = self.tier.reshape(-1), self.slot.reshape(-1)
        for batch in finished:
            self.inflight.remove(batch)
            self.moving[batch.flat] = False
            error = batch.error()
            if error is not None:
                self.slots[batch.dst].give_many(batch.dst_slots)
                self.version += 1
                raise error
            tier[batch.flat], slot[batch.flat] = batch.dst, batch.dst_slots
            self._free_slots(batch.src, batch.src_slots)
        if finished:
            self.version += 1

    def wait_all(self) -> None:
        for move in [*self.inflight, *self._cancelled]:
            with contextlib.suppress(Exception):  # a failed move raises from poll below
                move.wait()
        self.poll()

    def make_room(self, tier: int, n: int) -> None:
        """Make `n` slots of `tier` free now, demoting its least important movable slices (waits)."""
        if len(self.slots[tier]) >= n:
            return
        if tier == len(self.slots) - 1 or self.slots[tier + 1].total == 0:
            raise MegatierError(f"the {TIER_NAMES[tier]} KV tier is full and there is no lower tier to spill to")
        self.wait_all()
        need = n - len(self.slots[tier])
        movable = self.slices_in(tier)
        movable = movable[~self.writing[movable // self.num_layers]]
        if len(movable) < need:
            raise MegatierError(
                f"the {TIER_NAMES[tier]} KV tier holds {self.slots[tier].total // self.num_layers} pages and this"
                f" step writes to {int(self.writing.sum())} of them: raise kv_hbm or lower max_num_batched_tokens"
                " / max_num_seqs"
            )
        victims = movable[np.argsort(self.priority.reshape(-1)[movable], kind="stable")[:need]]
        self.make_room(tier + 1, need)
        self.move(victims, tier + 1)
        self.wait_all()

    def place_for_writing(self, pages: list[int]) -> list[int]:
        """Every slice of `pages` (about to be written) in HBM: new pages get HBM slots, pages with a
        slice elsewhere (a sequence resumed after its tail was demoted) are brought up now. Marks them
        as being written, so nothing moves them this step; returns the pages that were new."""
        self.writing[:] = False
        self.writing[pages] = True
        new = [p for p in pages if self.tier[p, 0] == UNPLACED]
        self.make_room(HBM, len(new) * self.num_layers)
        for p in new:
            for layer in range(self.num_layers):
                self.assign(p, layer, HBM)
        for page in pages:
            while (self.tier[page] != HBM).any():
                flat = page * self.num_layers + np.flatnonzero(self.tier[page] != HBM)
                if self._any_in_flight(flat):
                    self.wait_all()
                    continue
                for up in (DRAM, HBM):  # disk -> DRAM first, then DRAM -> HBM
                    lift = flat[self.tier.reshape(-1)[flat] == up + 1]
                    self.make_room(up, len(lift))
                    self.move(lift, up)
                    self.wait_all()
        return new

    # -- reading slices ----------------------------------------------------------------------------------

    def read_disk_slices(self, slots: list[int], out: torch.Tensor) -> None:
        """Read disk slots into out[i] (host tensor of slices), in parallel, each verified."""
        views = [out[i].view(-1).view(torch.uint8).numpy() for i in range(len(slots))]
        for f in [self.io.submit(self.disk.read, s, v) for s, v in zip(slots, views, strict=True)]:
            f.result()

    def gather(self, pages: np.ndarray, layer: int) -> torch.Tensor:
        """Layer `layer` of `pages` from whatever tier holds them: [n, 1, 2, Hkv, P, D] on the HBM device."""
        pages = np.asarray(pages, dtype=np.int64)
        out = torch.empty((len(pages), *self.slice_shape), dtype=self.dtype, device=self.device)
        tiers, slots = self.tier[pages, layer], self.slot[pages, layer]
        for tier in (HBM, DRAM, DISK):
            idx = np.flatnonzero(tiers == tier)
            if len(idx) == 0:
                continue
            where = torch.from_numpy(idx).to(self.device)
            if tier == HBM:
                out[where] = self.hbm.kv[torch.from_numpy(slots[idx].astype(np.int64)).to(self.device)]
            elif tier == DRAM:
                out[where] = self.dram[torch.from_numpy(slots[idx].astype(np.int64))].to(self.device)
            else:
                part = torch.empty((len(idx), *self.slice_shape), dtype=self.dtype)
                self.read_disk_slices(slots[idx].tolist(), part)
                out[where] = part.to(self.device)
        return out

    def read_page(self, page: int) -> torch.Tensor:
        """A whole page (every layer) from wherever its slices are, as a host tensor [L, 2, Hkv, P, D]."""
        return torch.cat([self.gather(np.array([page]), layer)[0].cpu() for layer in range(self.num_layers)])


class TieredPageAllocator(PageAllocator):
    """The scheduler's allocator of logical pages; freeing a page also frees its slices in every tier.
    Freed pages are reused most recently freed first (see PageAllocator)."""

    def __init__(self, pools: TieredPools):
        super().__init__(pools.num_pages)
        self.pools = pools

    def free(self, pages: list[int]) -> None:
        self.pools.release(pages)
        super().free(pages)
