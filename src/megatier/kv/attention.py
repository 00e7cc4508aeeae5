"""Tiered decode attention: every tier attends over its own pages and the partials merge exactly.

For each decode step and layer (DESIGN.md, "Exact merge"):
- HBM pages: the Triton split-KV kernel on the GPU (on a CPU-only machine, "HBM" is host memory and
  the CPU kernel stands in).
- DRAM pages: the CPU kernel (cpu_attention.c) reads them in place, started as soon as q reaches the
  host and overlapped with the GPU's partial. In dense mode a share of the DRAM pages is instead copied
  to the GPU over PCIe (fetch.py, one layer ahead), the share chosen each step from the bandwidths the
  two paths achieved, so both finish together.
- Disk pages: the layer's slice is read into host memory (checksummed) and the CPU kernel reads it.
Each partial is (normalized output, natural-log LSE); `merge_attention_states` combines them, so the
result equals dense attention over the union up to rounding, whatever the split.

Dense mode reads every page every step (lossless). Sparse mode reads, per sequence and layer, the sinks,
the recent window and the best-scored pages up to a fraction of the context (locality.py); pages are
scored from GPU metadata, so pages that are not selected are never touched.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from megatier.config import ModelConfig
from megatier.executors.base import StepBatch
from megatier.kv.cpu_attention import cpu_attention
from megatier.kv.locality import (
    Importance,
    PageMeta,
    forced_columns,
    recent_pages_for,
    select_pages,
    sparse_budget_pages,
)
from megatier.kv.tiers import DISK, DRAM, HBM, TieredKV

log = logging.getLogger(__name__)
MODES = ("dense", "sparse")


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_partial(
    q: torch.Tensor, kv: torch.Tensor, layer: int, tables: torch.Tensor, lens: torch.Tensor, scale: float, threads=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, D] over tables [B, W] (int32 slots of `kv`) holding lens[b] tokens each
    (full pages, the last one possibly partial): the Triton kernel on CUDA, the CPU kernel on the host."""
    if q.is_cuda:
        from megatier.kernels.decode_attention import paged_decode_attention

        sms = _num_sms(q.device)
        splits = max(1, min(16, 2 * sms // max(1, q.shape[0] * kv.shape[3]), tables.shape[1] // 4 or 1))
        return paged_decode_attention(q, kv, layer, tables, lens, splits, scale)
    lens_np = lens.numpy().astype(np.int64)
    page_size = kv.shape[4]
    counts = -(-lens_np // page_size)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    pages = np.concatenate([tables[b, : counts[b]].numpy() for b in range(len(counts))] + [np.zeros(0, np.int32)])
    rows = np.full(len(pages), page_size, dtype=np.int32)
    for b in np.flatnonzero(counts):
        rows[offsets[b + 1] - 1] = lens_np[b] - (counts[b] - 1) * page_size
    out, lse = cpu_attention(q.float(), kv[:, layer], offsets, pages, rows, scale, threads=threads)
    return out, lse


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], out_dtype: torch.dtype) -> torch.Tensor:
    """Merge partials [(out [B, H, D], lse [B, H])] exactly into the attention output."""
    if len(parts) == 1:
        return parts[0][0].to(out_dtype)
    outs = torch.stack([o.float() for o, _ in parts])
    lses = torch.stack([lse.float() for _, lse in parts])
    if outs.is_cuda:
        from megatier.kernels.merge import merge_attention_states

        return merge_attention_states(outs, lses, out_dtype=out_dtype)[0]
    from megatier.kernels.merge import merge_attention_states_reference

    return merge_attention_states_reference(outs, lses)[0].to(out_dtype)


def _csr(lists: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, slots, rows) of per-sequence (slots, rows) arrays."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s, _ in lists])
    slots = np.concatenate([s for s, _ in lists] + [np.zeros(0)]).astype(np.int32)
    rows = np.concatenate([r for _, r in lists] + [np.zeros(0)]).astype(np.int32)
    return offsets, slots, rows


@dataclass
class TierStats:
    """What the decode steps since the last reset read and did (bytes are K+V of the pages read)."""

    steps: int = 0
    bytes_read: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("hbm", "pcie", "dram", "disk"), 0))
    selected_pages: int = 0  # page-layers read
    hbm_hits: int = 0  # of those, already in HBM
    migrated_bytes: int = 0
    cpu_s: float = 0.0  # host time in CPU attention (disk reads included)
    gpu_s: float = 0.0  # GPU time of the GPU partials (CUDA only)
    overlap_s: float = 0.0  # per layer, the shorter of the two: time hidden behind the other path

    @property
    def hit_rate(self) -> float:
        return self.hbm_hits / self.selected_pages if self.selected_pages else 1.0

    def as_dict(self) -> dict:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "bytes_read_per_step": {k: v / n for k, v in self.bytes_read.items()},
            "hbm_hit_rate": self.hit_rate,
            "migrated_bytes_per_step": self.migrated_bytes / n,
            "cpu_attention_ms_per_step": 1e3 * self.cpu_s / n,
            "gpu_attention_ms_per_step": 1e3 * self.gpu_s / n,
            "overlap_ms_per_step": 1e3 * self.overlap_s / n,
        }


class TieredAttention:
    def __init__(
        self,
        cfg: ModelConfig,
        tiers: TieredKV,
        *,
        mode: str = "dense",
        sparse_fraction: float = 0.125,
        sink_pages: int = 1,
        recent_tokens: int = 64,
        cpu_threads: int | None = None,
        pcie_share: float | None = None,
        fetch_all: bool = False,
        sparse_misses: str = "gpu",
    ):
        """pcie_share: the share of DRAM pages a dense step fetches to the GPU (None: balance by measured
        bandwidths; 0: the CPU reads them all). fetch_all: the offload-and-fetch baseline (every DRAM page
        goes over PCIe, no CPU attention). sparse_misses: who reads the selected pages that are not in HBM
        in sparse mode on CUDA: "gpu" (zero-copy over PCIe, no host sync) or "cpu" (the CPU kernel)."""
        if mode not in MODES:
            raise ValueError(f"kv_mode must be one of {MODES}, not {mode!r}")
        self.cfg, self.tiers, self.mode = cfg, tiers, mode
        self.device = tiers.device
        self.scale = cfg.head_dim**-0.5
        self.page_size = tiers.page_shape[3]
        self.sparse_fraction = sparse_fraction
        self.sink_pages = sink_pages
        self.recent_pages = recent_pages_for(recent_tokens, self.page_size)
        self.cpu_threads = cpu_threads
        self.pcie_share, self.fetch_all, self.sparse_misses = pcie_share, fetch_all, sparse_misses
        self.bw = {"cpu": 50e9, "pcie": 25e9}  # running estimates (bytes/s), refined from every step
        self.meta = PageMeta(tiers.num_pages, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tiers.dtype, self.device)
        self.importance = Importance(tiers.num_pages, cfg.num_layers, self.device)
        self.fetcher = None
        self.stats = TierStats()
        self.timing = self.device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}
        self._zero_copy_ok: bool | None = None

    # -- per step ----------------------------------------------------------------------------------------

    def begin_step(self, batch: StepBatch) -> np.ndarray:
        """Plan a decode step of `batch` (logical page tables); returns the forced (sink/recent) pages."""
        p = self.page_size
        ctx = np.array(batch.context_lens, dtype=np.int64)
        self.num_pages = -(-ctx // p)
        self.last_rows = (ctx - (self.num_pages - 1) * p).astype(np.int32)
        width = int(self.num_pages.max())
        tables = np.zeros((len(ctx), width), dtype=np.int64)
        for b, t in enumerate(batch.page_tables):
            tables[b, : self.num_pages[b]] = t[: self.num_pages[b]]
        self.tables = tables
        self.valid = np.arange(width)[None, :] < self.num_pages[:, None]
        forced = forced_columns(self.num_pages, width, self.sink_pages, self.recent_pages) & self.valid
        self._layer_stats: list[tuple[float, torch.cuda.Event | None, torch.cuda.Event | None]] = []
        self._device_counts = torch.zeros(3, dtype=torch.int64, device=self.device)  # hits, selected, zero-copy
        if self.mode == "dense":
            self._plan_dense()
        else:
            self._plan_sparse(forced)
        return np.unique(tables[forced])

    def _plan_dense(self) -> None:
        tiers, p = self.tiers, self.page_size
        hbm, fetch, cpu, disk = [], [], [], []
        share = 1.0 if self.fetch_all else self._pcie_share()
        for b in range(len(self.num_pages)):
            n = int(self.num_pages[b])
            pages = self.tables[b, :n]
            rows = np.full(n, p, dtype=np.int32)
            rows[-1] = self.last_rows[b]
            tier, slot = tiers.tier[pages], tiers.slot[pages]
            on = {t: np.flatnonzero(tier == t) for t in (HBM, DRAM, DISK)}
            # In column order, so a partial last page comes last, as the GPU kernel requires.
            hbm.append((slot[on[HBM]], rows[on[HBM]]))
            full = on[DRAM][rows[on[DRAM]] == p]
            take = full[: round(share * len(full))] if self.device.type == "cuda" else full[:0]
            rest = np.setdiff1d(on[DRAM], take)
            fetch.append((slot[take], rows[take]))
            cpu.append((slot[rest], rows[rest]))
            disk.append((slot[on[DISK]], rows[on[DISK]]))
        self._hbm_tables = self._gpu_tables(hbm)
        self._cpu_lists, self._disk_lists = _csr(cpu), _csr(disk)
        self._fetch_tables = None
        fetch_slots = np.sort(np.concatenate([s for s, _ in fetch]))
        if len(fetch_slots):
            index = [(np.searchsorted(fetch_slots, s).astype(np.int32), r) for s, r in fetch]
            self._fetch_tables = self._gpu_tables(index)
            self._ensure_fetcher(len(fetch_slots)).set_pages(fetch_slots)
            self.fetcher.start(0)
        self._dense_counts = [sum(len(s) for s, _ in lists) for lists in (hbm, fetch, cpu, disk)]
        self.stats.selected_pages += sum(self._dense_counts) * self.cfg.num_layers
        self.stats.hbm_hits += self._dense_counts[0] * self.cfg.num_layers

    def _plan_sparse(self, forced: np.ndarray) -> None:
        dev = self.device
        # Selected DRAM pages are few when placement works: reading them from the GPU over PCIe beats a
        # host round trip per layer. Disk pages still need the host (read, verify, CPU kernel).
        self._zero_copy = self.sparse_misses == "gpu" and dev.type == "cuda" and self.tiers.used(DISK) == 0
        if self._zero_copy and self._zero_copy_ok is None:
            self._zero_copy_ok = self._try_zero_copy()
        self._zero_copy = self._zero_copy and self._zero_copy_ok
        self._tables_dev = torch.from_numpy(self.tables).to(dev)
        self._valid_dev = torch.from_numpy(self.valid).to(dev)
        self._forced_dev = torch.from_numpy(forced).to(dev)
        budget = sparse_budget_pages(self.num_pages, self.sparse_fraction, forced.sum(1))
        self._budget_dev = torch.from_numpy(budget).to(dev)
        self._k_max = int(budget.max())
        self._npages_dev = torch.from_numpy(self.num_pages).to(dev)
        self._last_rows_dev = torch.from_numpy(self.last_rows.astype(np.int64)).to(dev)
        self._tier_dev = torch.from_numpy(self.tiers.tier.astype(np.int64)).to(dev)
        self._slot_dev = torch.from_numpy(self.tiers.slot.astype(np.int64)).to(dev)

    def end_step(self) -> None:
        """Fold the step's measurements into the stats and the bandwidth estimates."""
        if self.mode == "sparse":
            self.importance.end_step()
            hits, selected, zero_copy = self._device_counts.tolist()
            self.stats.hbm_hits += hits
            self.stats.selected_pages += selected
            self.stats.bytes_read["hbm"] += hits * self.tiers.slice_bytes
            self.stats.bytes_read["pcie"] += zero_copy * self.tiers.slice_bytes
        else:
            for name, n in zip(("hbm", "pcie", "dram", "disk"), self._dense_counts, strict=True):
                self.stats.bytes_read[name] += n * self.tiers.slice_bytes * self.cfg.num_layers
        cpu_total = gpu_total = 0.0
        if self._layer_stats and self._layer_stats[-1][2] is not None:
            self._layer_stats[-1][2].synchronize()  # the step's GPU work is done: its timings can be read
        for cpu_s, start, end in self._layer_stats:
            gpu_s = start.elapsed_time(end) / 1e3 if start is not None else 0.0
            cpu_total, gpu_total = cpu_total + cpu_s, gpu_total + gpu_s
            self.stats.overlap_s += min(cpu_s, gpu_s)
        self.stats.cpu_s += cpu_total
        self.stats.gpu_s += gpu_total
        self.stats.steps += 1
        if self.mode == "dense" and not self.fetch_all and self._dense_counts[2] and cpu_total > 0:
            cpu_bw = self._dense_counts[2] * self.tiers.slice_bytes * self.cfg.num_layers / cpu_total
            self.bw["cpu"] = 0.5 * self.bw["cpu"] + 0.5 * cpu_bw
        if self.fetcher is not None and self._fetch_tables is not None:
            fetch_bw = self.fetcher.measured_bandwidth()
            if fetch_bw:
                self.bw["pcie"] = 0.5 * self.bw["pcie"] + 0.5 * fetch_bw

    def _pcie_share(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        if self.pcie_share is not None:
            return self.pcie_share
        return self.bw["pcie"] / (self.bw["pcie"] + self.bw["cpu"])

    # -- per layer ---------------------------------------------------------------------------------------

    def decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, D] of decode queries q [B, H, D] for `layer`."""
        if self.mode == "dense":
            return self._decode_dense(layer, q)
        return self._decode_sparse(layer, q)

    def _decode_dense(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        cpu_work = self._cpu_lists[0][-1] + self._disk_lists[0][-1] > 0
        q_host, ready = self._to_host(q) if cpu_work else (None, None)
        start, end = self._gpu_events()
        parts = []
        if self._hbm_tables is not None:
            parts.append(paged_partial(q, self.tiers.hbm.kv, layer, *self._hbm_tables, self.scale, self.cpu_threads))
        if self._fetch_tables is not None:
            staged = self.fetcher.buffer(layer)
            parts.append(paged_partial(q, staged, 0, *self._fetch_tables, self.scale))
            self.fetcher.release(layer)
            if layer + 1 < self.cfg.num_layers:
                self.fetcher.start(layer + 1)
        if end is not None:
            end.record()
        cpu_s = 0.0
        if cpu_work:
            parts_cpu, cpu_s = self._cpu_partials(layer, q_host, ready, self._cpu_lists, self._disk_lists)
            parts += parts_cpu
        self._layer_stats.append((cpu_s, start, end))
        return merge(parts, q.dtype)

    def _decode_sparse(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        tables, valid = self._tables_dev, self._valid_dev
        scores, mass = self.meta.score(layer, q, tables, valid, self.scale)
        self.importance.add(tables, valid, mass, self._npages_dev)
        cols, chosen = select_pages(scores, self._forced_dev, valid, self._budget_dev, self._k_max)
        pages = tables.gather(1, cols)
        tier = self._tier_dev[pages]
        is_last = cols == (self._npages_dev - 1)[:, None]
        gpu_tables, lens, n_hbm = self._select_tier(pages, tier, chosen, is_last, HBM)
        self._device_counts[:2] += torch.stack((n_hbm.sum(), chosen.sum()))
        if self._zero_copy:
            return self._sparse_zero_copy(layer, q, pages, tier, chosen, is_last, gpu_tables, lens)
        misses = torch.where(chosen & (tier != HBM), pages, -1)
        q_host, ready = self._to_host(q, misses)
        start, end = self._gpu_events()
        parts = [paged_partial(q, self.tiers.hbm.kv, layer, gpu_tables, lens, self.scale, self.cpu_threads)]
        if end is not None:
            end.record()
        if ready is not None:
            ready.synchronize()
        missed = self._missed_host
        cpu_s = 0.0
        if (missed >= 0).any():
            dram, disk = [], []
            for b in range(missed.shape[0]):
                row = missed[b][missed[b] >= 0]
                where, slot = self.tiers.tier[row], self.tiers.slot[row]
                rows = np.where(row == self.tables[b, self.num_pages[b] - 1], self.last_rows[b], self.page_size)
                dram.append((slot[where == DRAM], rows[where == DRAM]))
                disk.append((slot[where == DISK], rows[where == DISK]))
            dram_l, disk_l = _csr(dram), _csr(disk)
            self.stats.bytes_read["dram"] += len(dram_l[1]) * self.tiers.slice_bytes
            self.stats.bytes_read["disk"] += len(disk_l[1]) * self.tiers.slice_bytes
            parts_cpu, cpu_s = self._cpu_partials(layer, q_host, None, dram_l, disk_l)
            parts += parts_cpu
        self._layer_stats.append((cpu_s, start, end))
        return merge(parts, q.dtype)

    def _sparse_zero_copy(self, layer, q, pages, tier, chosen, is_last, gpu_tables, lens) -> torch.Tensor:
        """Sparse step without a host round trip: the GPU kernel reads the few selected DRAM pages
        straight from pinned host memory over PCIe (zero-copy), next to its HBM partial."""
        dram_tables, dram_lens, n_dram = self._select_tier(pages, tier, chosen, is_last, DRAM)
        self._device_counts[2] += n_dram.sum()
        start, end = self._gpu_events()
        parts = [paged_partial(q, self.tiers.hbm.kv, layer, gpu_tables, lens, self.scale)]
        parts.append(paged_partial(q, self.tiers.dram, layer, dram_tables, dram_lens, self.scale))
        if end is not None:
            end.record()
        self._layer_stats.append((0.0, start, end))
        return merge(parts, q.dtype)

    def _try_zero_copy(self) -> bool:
        """Whether the GPU kernel accepts the pinned DRAM pool as a (zero-copy) KV pool."""
        heads = self.cfg.num_heads
        q = torch.zeros((1, heads, self.cfg.head_dim), dtype=self.tiers.dtype, device=self.device)
        table = torch.zeros((1, 1), dtype=torch.int32, device=self.device)
        try:
            paged_partial(q, self.tiers.dram, 0, table, torch.zeros(1, dtype=torch.int32, device=self.device), 1.0)
        except (RuntimeError, ValueError) as e:
            log.warning("the GPU cannot read pinned host KV directly (%s); the CPU reads sparse misses", e)
            return False
        return True

    def _select_tier(self, pages, tier, chosen, is_last, which: int):
        """Device block table of the chosen pages in tier `which` (partial last page at the end), their
        token counts and page counts; no host sync."""
        mine = (tier == which) & chosen
        order = ((~mine).long() * 2 + is_last.long()).argsort(dim=1, stable=True)
        table = self._slot_dev[pages].gather(1, order).int()
        count = mine.sum(1)
        last_in = (mine & is_last).any(1)
        lens = (count * self.page_size - last_in * (self.page_size - self._last_rows_dev)).int()
        return table, lens, count

    # -- helpers -----------------------------------------------------------------------------------------

    def _cpu_partials(self, layer, q_host, ready, dram_lists, disk_lists):
        """CPU partials over DRAM pages and staged disk slices; returns them on the device, and the time."""
        if ready is not None:
            ready.synchronize()
        t0 = time.perf_counter()
        parts = []
        if dram_lists[0][-1]:
            parts.append(
                cpu_attention(q_host, self.tiers.dram[:, layer], *dram_lists, self.scale, threads=self.cpu_threads)
            )
        if disk_lists[0][-1]:
            offsets, slots, rows = disk_lists
            staged = torch.empty((len(slots), *self.tiers.page_shape[1:]), dtype=self.tiers.dtype)
            self.tiers.read_disk_slices(slots.tolist(), layer, staged)
            index = np.arange(len(slots), dtype=np.int32)
            parts.append(cpu_attention(q_host, staged, offsets, index, rows, self.scale, threads=self.cpu_threads))
        elapsed = time.perf_counter() - t0
        return [
            (o.to(self.device, non_blocking=True), lse.to(self.device, non_blocking=True)) for o, lse in parts
        ], elapsed

    def _to_host(self, q: torch.Tensor, misses: torch.Tensor | None = None):
        """Start copying q (fp32) and the sparse misses to the host; returns (q_host, event or None)."""
        if not q.is_cuda:
            if misses is not None:
                self._missed_host = misses.numpy()
            return q.float(), None
        q_host = self._pinned("q", q.shape, torch.float32)
        q_host.copy_(q.float(), non_blocking=True)
        if misses is not None:
            host = self._pinned("misses", misses.shape, torch.int64)
            host.copy_(misses, non_blocking=True)
            self._missed_host = host.numpy()
        event = torch.cuda.Event()
        event.record()
        return q_host, event

    def _pinned(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A reused pinned host buffer (pinning is slow; each layer reuses the previous layer's)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < math.prod(shape):
            buf = self._buffers[name] = torch.empty(2 * math.prod(shape), dtype=dtype, pin_memory=True)
        return buf[: math.prod(shape)].view(shape)

    def _gpu_events(self):
        if not self.timing:
            return None, None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    def _gpu_tables(self, lists: list[tuple[np.ndarray, np.ndarray]]):
        """(tables [B, W] int32, lens [B] int32) on the device for per-sequence (slots, rows) arrays."""
        if not any(len(s) for s, _ in lists):
            return None
        width = max(len(s) for s, _ in lists)
        tables = np.zeros((len(lists), width), dtype=np.int32)
        lens = np.zeros(len(lists), dtype=np.int32)
        for b, (slots, rows) in enumerate(lists):
            tables[b, : len(slots)] = slots
            lens[b] = rows.sum()
        return torch.from_numpy(tables).to(self.device), torch.from_numpy(lens).to(self.device)

    def _ensure_fetcher(self, pages: int):
        if self.fetcher is None or self.fetcher.staging.shape[1] < pages:
            from megatier.kv.fetch import LayerFetcher

            self.fetcher = None
            self.fetcher = LayerFetcher(self.tiers, math.ceil(pages * 1.25))
        return self.fetcher
