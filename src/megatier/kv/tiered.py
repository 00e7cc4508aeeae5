"""TieredKV: the KV store whose slices live in HBM, pinned DRAM and disk (kv/store.py's interface).

Per decode step and layer (DESIGN.md, "Exact merge"), every tier attends over its own slices and the
partials, each (normalized output, natural-log LSE), merge exactly:
- HBM slices: the executor's own attention kernel over compact per-layer tables of HBM slots.
- DRAM slices, dense mode: host cores read most of them in place (the C kernel, kv/host_partial.py);
  a share is copied to an HBM staging buffer over PCIe by one gather kernel and read there, the share
  balanced each step so the CPU and PCIe paths finish together.
- DRAM slices, sparse mode: the few selected ones are read by the GPU kernel straight from pinned
  memory over PCIe (zero-copy), or gathered first ("fetch", the sparse offload baseline), or read by the
  host ("cpu").
- Disk slices: read (checksummed) into host memory per layer and attended by the host; such steps run
  eagerly (`plan.graph_key` is None), since a captured graph cannot wait for Python.
Everything a step reads lives in persistent buffers that `begin_step` rewrites, so the graph executor
captures a tiered decode step in a CUDA graph and replays it; the host partial joins inside the graph as
a host node. Dense mode reads every slice every step (lossless); sparse mode reads, per sequence and
layer, the sinks, the recent window and the best-scored pages up to a fraction of the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors.base import StepBatch
from megatier.kernels.copy_slices import copy_slices
from megatier.kernels.merge import merge_attention_states, merge_attention_states_reference
from megatier.kv.host_partial import HostPartial
from megatier.kv.locality import (
    PIN_BONUS,
    RESIDENCY_BONUS,
    Importance,
    PageMeta,
    plan_migrations,
    recent_pages_for,
    select_pages,
    sparse_budget_pages,
)
from megatier.kv.pages import slot_mapping
from megatier.kv.store import HbmAttention, LayerKV
from megatier.kv.tiers import DISK, DRAM, HBM, TIER_NAMES, TieredPageAllocator, TieredPools

MODES = ("dense", "sparse")
SPARSE_MISSES = ("gpu", "fetch", "cpu")


@dataclass
class TierStats:
    """What the decode steps since the last reset read and did (bytes are K+V of the slices read)."""

    steps: int = 0
    bytes_read: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("hbm", "pcie", "dram", "disk"), 0))
    selected_slices: int = 0  # (page, layer) slices read
    hbm_hits: int = 0  # of those, already in HBM
    migrated_bytes: int = 0
    cpu_s: float = 0.0  # host time in CPU attention (disk reads included)
    step_s: float = 0.0  # wall time from one decode step's start to the next one's

    @property
    def hit_rate(self) -> float:
        return self.hbm_hits / self.selected_slices if self.selected_slices else 1.0

    def as_dict(self) -> dict:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "bytes_read_per_step": {k: v / n for k, v in self.bytes_read.items()},
            "hbm_hit_rate": self.hit_rate,
            "migrated_bytes_per_step": self.migrated_bytes / n,
            "cpu_attention_ms_per_step": 1e3 * self.cpu_s / n,
            "cpu_busy_fraction": self.cpu_s / self.step_s if self.step_s else 0.0,
            "cpu_attention_GBps": self.bytes_read.get("dram", 0) / self.cpu_s / 1e9 if self.cpu_s else 0.0,
        }


class ShareBalancer:
    """The share of a dense step's DRAM slices that PCIe reads (the CPU reads the rest). Both paths read
    host memory, so their speeds depend on each other; rather than model that, each step nudges the share
    toward the point where the host cores are busy for most of the step but not all of it: busier means
    the CPU path is the longer one (give PCIe more), idle means PCIe is (give the CPU more)."""

    TARGET = 0.85

    def __init__(self, share: float, fixed: bool):
        self.share, self.fixed = share, fixed
        self.delta = 0.05

    def update(self, cpu_busy: float) -> None:
        if self.fixed:
            return
        direction = 1.0 if cpu_busy > self.TARGET else -1.0
        self.share = min(1.0, max(0.0, self.share + direction * self.delta))
        self.delta = max(0.005, self.delta * 0.9)


@dataclass
class TierPlan:
    """One step over the tiered store (kv/store.py's StepPlan)."""

    batch: StepBatch
    tables: torch.Tensor  # the executor's logical tables [Bd, W] (device)
    lens: torch.Tensor  # context lengths [Bd] (device); padding rows 0
    decode: bool
    graph_key: tuple | None = ()
    context_in_hbm: list[bool] = field(default_factory=list)  # per layer, prompt chunks only
    written: list[int] = field(default_factory=list)
    forced_pages: np.ndarray | None = None


class TieredKV:
    tiered = True

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
        mode: str = "dense",
        sparse_budget: float = 0.125,
        residency_bonus: float | None = None,
        sink_pages: int = 1,
        recent_tokens: int = 64,
        migrate: bool = True,
        migration_bytes: int | None = None,
        cpu_threads: int | None = None,
        pcie_share: float | None = None,
        fetch_all: bool = False,
        sparse_misses: str = "gpu",
        pools: TieredPools | None = None,
    ):
        """pools: existing (empty) pools to run on instead of new ones of the given sizes (benchmarks
        compare methods on one set). migrate: run the online placement scheduler (False: slices stay where they were first put,
        the static-placement baselines). migration_bytes: per-step byte budget of migrations. pcie_share:
        a fixed share of dense DRAM slices read over PCIe (None: balanced each step). fetch_all: the
        offload-and-fetch baseline (every DRAM slice over PCIe, no CPU attention). sparse_misses: who reads
        selected slices outside HBM in sparse mode on CUDA (SPARSE_MISSES). residency_bonus: logits added
        to the selection score of slices in HBM (None: locality.RESIDENCY_BONUS, which says why)."""
        if mode not in MODES:
            raise MegatierError(f"kv_mode must be 'dense' or 'sparse', not {mode!r}")
        if not 0 < sparse_budget <= 1:
            raise MegatierError(f"kv_sparse_budget is a fraction of the context in (0, 1], not {sparse_budget}")
        residency_bonus = RESIDENCY_BONUS if residency_bonus is None else residency_bonus
        if not 0 <= residency_bonus < float("inf"):
            raise MegatierError(f"kv_sparse_residency_bonus is a non-negative number of logits, not {residency_bonus}")
        if pcie_share is not None and not 0 <= pcie_share <= 1:
            raise MegatierError(f"pcie_share is a fraction of the DRAM slices in [0, 1], not {pcie_share}")
        if min(hbm_bytes, dram_bytes, disk_bytes) < 0:
            raise MegatierError("kv_hbm, kv_dram and kv_disk must not be negative")
        if sparse_misses not in SPARSE_MISSES:
            raise ValueError(f"sparse_misses must be one of {SPARSE_MISSES}")
        self.cfg, self.device, self.dtype, self.mode = cfg, device, dtype, mode
        self.pools = pools or TieredPools(
            cfg,
            page_size=page_size,
            dtype=dtype,
            device=device,
            hbm_bytes=hbm_bytes,
            dram_bytes=dram_bytes,
            disk_bytes=disk_bytes,
            disk_dir=disk_dir,
        )
        self.allocator = TieredPageAllocator(self.pools)
        self.num_pages, self.page_size, self.num_layers = self.pools.num_pages, page_size, cfg.num_layers
        self.hbm_pool, self.dram_pool = self.pools.hbm.kv, self.pools.dram
        self.scale = cfg.head_dim**-0.5
        self.sparse_budget, self.sink_pages, self.residency_bonus = sparse_budget, sink_pages, residency_bonus
        self.recent_pages = recent_pages_for(recent_tokens, page_size)
        self.migrate = migrate
        # Per step, an eighth of HBM (swaps in place need no free slot, so the reserve does not bound
        # it; on an H100 the sparse bench's hit rate went 0.47 -> 0.93 from twice the reserve to this:
        # docs/PERF.md), and at least 8 pages' worth (a small HBM still follows within a few steps).
        default_slices = max(2 * self.pools.reserve[HBM], 8 * cfg.num_layers, self.pools.capacity(HBM) // 8)
        self.migration_bytes = migration_bytes or default_slices * self.pools.slice_bytes
        self.fetch_all, self.sparse_misses = fetch_all, sparse_misses
        cuda = device.type == "cuda"
        start_share = 1.0 if fetch_all else pcie_share if pcie_share is not None else 0.3 if cuda else 0.0
        self.balancer = ShareBalancer(start_share, fixed=fetch_all or pcie_share is not None or not cuda)
        self.meta = PageMeta(self.num_pages, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, device)
        self.importance = Importance(self.num_pages, cfg.num_layers, device)
        self.host = HostPartial(self.dram_pool, cfg, self.scale, device, cpu_threads)
        self.stats = TierStats()
        # Device copies of the slice map (+ a spare row for padding), refreshed when the map changes.
        self._tier_dev = torch.full((self.num_pages + 1, self.num_layers), -1, dtype=torch.int32, device=device)
        self._slot_dev = torch.zeros((self.num_pages + 1, self.num_layers), dtype=torch.int32, device=device)
        self._map_version = -1
        self._maps_host = torch.zeros((2, self.num_pages, self.num_layers), dtype=torch.int32, pin_memory=cuda)
        self._maps_uploaded = torch.cuda.Event() if cuda else None
        self._buffers: dict[str, torch.Tensor] = {}
        self._generation = 0  # bumped when a persistent buffer is reallocated (captured graphs go stale)
        self._counts = torch.zeros(3, dtype=torch.int64, device=device)  # sparse: hits, selected, over PCIe
        # Their host copies, and the step's importances, read back behind an event (end_step).
        self._host_counts = torch.zeros(3, dtype=torch.int64, pin_memory=cuda)
        priority_shape = (self.num_pages, self.num_layers) if mode == "sparse" else (0,)
        self._host_priority = torch.zeros(priority_shape, dtype=torch.float32, pin_memory=cuda)
        self._readback = torch.cuda.Event() if cuda else None
        self._fetch_stream = torch.cuda.Stream(device) if cuda else None
        # Per staging buffer: (its copy is done, its reader is done).
        self._fetch_events = [(torch.cuda.Event(), torch.cuda.Event()) for _ in range(2)] if cuda else []
        self._last_step_start: float | None = None
        self._last_step_s: float | None = None

    # -- the KVStore interface ---------------------------------------------------------------------------

    def begin_step(self, batch: StepBatch, tables: torch.Tensor, lens: torch.Tensor) -> TierPlan:
        pools = self.pools
        now = time.perf_counter()
        self._last_step_s = None
        if batch.is_decode() and self._last_step_start is not None:
            self._last_step_s = now - self._last_step_start
            self.stats.step_s += self._last_step_s
        self._last_step_start = now if batch.is_decode() else None
        pools.poll()
        pages, _ = slot_mapping(batch.page_tables, batch.positions(), self.page_size)
        written = sorted(set(pages))
        new = pools.place_for_writing(written)
        if new:
            fresh = torch.tensor(new, device=self.device)
            self.meta.reset(fresh)
            self.importance.reset(fresh)
        self._refresh_maps()
        plan = TierPlan(batch, tables, lens, batch.is_decode(), written=written)
        ctx = np.array(batch.context_lens, dtype=np.int64)
        num_pages = -(-ctx // self.page_size)
        plan.forced_pages = self._forced_pages(batch.page_tables, num_pages)
        if self.mode == "sparse" and plan.decode:  # the whole tables stay on the device
            self._plan_sparse(plan, num_pages)
            return plan
        logical = _padded(batch.page_tables, num_pages)
        if not plan.decode:
            tier = pools.tier[np.maximum(logical, 0)]  # [B, W, L]
            plan.context_in_hbm = (((tier == HBM) | (logical < 0)[..., None]).all(axis=(0, 1))).tolist()
            plan.graph_key = None
        else:
            self._plan_dense(plan, logical, ctx, num_pages)
        return plan

    def _forced_pages(self, tables: list[list[int]], num_pages: np.ndarray) -> np.ndarray:
        """The sink and recent-window pages of every sequence (kv/locality.py's forced_columns), read
        from the ends of the tables only: a step's whole tables are ~1 ms of list conversion at 32K."""
        ends = [
            (table[: min(self.sink_pages, n)], table[max(0, n - self.recent_pages) : n])
            for table, n in zip(tables, num_pages.tolist(), strict=True)
        ]
        return np.unique(np.fromiter((page for pair in ends for part in pair for page in part), dtype=np.int64))

    def layer_kv(self, plan: TierPlan, layer: int) -> LayerKV:
        """Physical tables of `layer`: HBM slots of every logical column (new K/V always land in HBM;
        columns outside HBM hold other tiers' slots, which only compact tables ever read)."""
        return LayerKV(self.hbm_pool, 0, self._slot_dev[:, layer][plan.tables.long()], plan.lens)

    def context(self, plan: TierPlan, layer: int) -> LayerKV:
        """A prompt chunk's whole context for `layer`: the HBM tables when every slice is there, else
        every slice gathered into one staging pool (read after this layer's new K/V are written)."""
        if plan.context_in_hbm[layer]:
            return self.layer_kv(plan, layer)
        ctx = np.array(plan.batch.context_lens, dtype=np.int64)
        counts = -(-ctx // self.page_size)
        pages = np.concatenate(
            [np.asarray(t[:n], dtype=np.int64) for t, n in zip(plan.batch.page_tables, counts, strict=True)]
        )
        staging = self.pools.gather(pages, layer)
        width = int(counts.max())
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        tables = first[:, None] + np.minimum(np.arange(width)[None, :], np.maximum(counts - 1, 0)[:, None])
        tables_dev = torch.from_numpy(tables.astype(np.int32)).to(self.device)
        return LayerKV(staging, 0, tables_dev, plan.lens)

    def attend(self, plan: TierPlan, layer: int, q: torch.Tensor, hbm_attention: HbmAttention) -> torch.Tensor:
        if not plan.decode:
            raise ValueError("tiered attention runs decode batches; prompt chunks read context()")
        if self.mode == "dense":
            parts = self._attend_dense(layer, q, hbm_attention)
        else:
            parts = self._attend_sparse(plan, layer, q, hbm_attention)
        return _merge(parts, q.dtype)

    def end_step(self, plan: TierPlan) -> None:
        """Importance, statistics, placement priorities, migrations. The migrations are planned on the
        priorities the previous step left, while the device still runs this step (planning is host
        work of several ms a step); this step's counters and importances come back to pinned memory
        behind an event, and become the next plan's priorities."""
        pools, sparse = self.pools, self.mode == "sparse"
        if plan.decode:
            self.stats.steps += 1
            self.stats.cpu_s += self.host.elapsed()
            if sparse:
                self.importance.end_step()
        elif sparse:
            self._meta_from_pages(plan.written)
        if sparse:
            self._host_counts.copy_(self._counts, non_blocking=True)
            self._host_priority.copy_(self.importance.value[: self.num_pages], non_blocking=True)
            self._counts.zero_()
            if self._readback is not None:
                self._readback.record()
        if self.migrate:
            self.stats.migrated_bytes += plan_migrations(pools, self.migration_bytes)
        if sparse:
            if self._readback is not None:
                self._readback.synchronize()
            if plan.decode:
                hits, selected, pcie = self._host_counts.tolist()
                self.stats.hbm_hits += hits
                self.stats.selected_slices += selected
                self.stats.bytes_read["hbm"] += hits * pools.slice_bytes
                self.stats.bytes_read["pcie"] += pcie * pools.slice_bytes
                self.stats.bytes_read["dram"] += self.host.take_bytes_read()
            pools.priority[:] = self._host_priority.numpy()
        else:
            pools.priority[:] = 0.0
        pools.priority[plan.forced_pages] += PIN_BONUS

    # -- bookkeeping -------------------------------------------------------------------------------------

    def page_bytes(self) -> int:
        return self.pools.page_bytes

    def writable_pages(self) -> int:
        """Pages one step may write: every layer of each must be in HBM at once (beside the reserve)."""
        return (self.pools.capacity(HBM) - self.pools.reserve[HBM]) // self.num_layers

    def used(self, tier: int) -> int:
        return self.pools.used(tier)

    def capacity(self, tier: int) -> int:
        return self.pools.capacity(tier)

    def pages_per_tier(self) -> dict[str, float]:
        """Slices in each tier, in pages' worth (for metrics)."""
        return {name: self.pools.used(t) / self.num_layers for t, name in enumerate(TIER_NAMES)}

    def close(self) -> None:
        self.pools.close()

    def _refresh_maps(self) -> None:
        """Upload the slice map (tier and slot of every slice) after it changed, through one persistent
        pinned buffer (pinning 4 MB afresh each step cost ~1 ms at 32K x 16 layers); the previous
        upload from it must be done before it is rewritten."""
        if self._map_version == self.pools.version:
            return
        if self._maps_uploaded is not None:
            self._maps_uploaded.synchronize()
        staging = self._maps_host.numpy()
        np.copyto(staging[0], self.pools.tier, casting="unsafe")
        np.copyto(staging[1], self.pools.slot, casting="unsafe")
        self._tier_dev[: self.num_pages].copy_(self._maps_host[0], non_blocking=True)
        self._slot_dev[: self.num_pages].copy_(self._maps_host[1], non_blocking=True)
        if self._maps_uploaded is not None:
            self._maps_uploaded.record()
        self._map_version = self.pools.version

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A persistent device buffer at least `shape`, grown by powers of two; growing bumps the
        generation, since a captured graph holds the old one's address."""
        buf = self._buffers.get(name)
        if buf is None or any(have < want for have, want in zip(buf.shape, shape, strict=True)):
            size = [1 << max(0, n - 1).bit_length() for n in shape]
            if buf is not None:
                size = [max(a, b) for a, b in zip(size, buf.shape, strict=True)]
            buf = self._buffers[name] = torch.zeros(size, dtype=dtype, device=self.device)
            self._generation += 1
        return buf

    def _upload(self, name: str, array: np.ndarray, full_shape: tuple[int, ...]) -> torch.Tensor:
        """Copy `array` into the leading corner of persistent device buffer `name` (rest zero)."""
        buf = self._buffer(name, full_shape, torch.int32)
        region = tuple(slice(0, n) for n in array.shape)
        host = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32))
        if self.device.type == "cuda":
            host = host.pin_memory()
        buf.zero_()
        buf[region].copy_(host, non_blocking=True)
        return buf

    # -- dense -------------------------------------------------------------------------------------------

    def _plan_dense(self, plan: TierPlan, logical: np.ndarray, ctx: np.ndarray, num_pages: np.ndarray) -> None:
        """Split every (sequence, layer)'s slices by tier: compact HBM tables, the PCIe share (gathered
        into staging), the host's lists, and disk slices (which make the step eager)."""
        pools, p, layers = self.pools, self.page_size, self.num_layers
        rows_dev, width_dev = plan.tables.shape
        b, w = logical.shape
        valid = logical >= 0
        safe = np.maximum(logical, 0)
        tier = np.where(valid[..., None], pools.tier[safe], -1).transpose(2, 0, 1)  # [L, B, W]
        slot = pools.slot[safe].transpose(2, 0, 1)
        rows = np.full((b, w), p, dtype=np.int64)
        rows[np.arange(b), num_pages - 1] = ctx - (num_pages - 1) * p
        in_hbm = tier == HBM
        hbm_tables = _compact(in_hbm, slot)
        hbm_lens = (in_hbm * rows[None]).sum(2)
        on_dram = tier == DRAM
        count = on_dram.sum(2)
        take = np.rint(self.balancer.share * count).astype(np.int64)
        rank = np.cumsum(on_dram, axis=2) - 1
        to_gpu = on_dram & (rank < take[..., None])
        to_cpu = on_dram & ~to_gpu
        on_disk = tier == DISK
        # The PCIe share: per layer, the DRAM slots to gather (in sequence order) and per-row tables into
        # the staging buffer.
        per_layer = to_gpu.sum(axis=(1, 2))
        capacity = max(1, int(per_layer.max()))
        fetch_src = np.zeros((layers, capacity), dtype=np.int64)
        fetch_tables = np.zeros((layers, b, max(1, int(take.max()))), dtype=np.int64)
        for layer in range(layers):
            fetch_src[layer, : per_layer[layer]] = slot[layer][to_gpu[layer]]
            first = np.concatenate(([0], np.cumsum(take[layer])[:-1]))
            fetch_tables[layer] = first[:, None] + np.arange(fetch_tables.shape[2])[None, :]
        self._dense = {
            "hbm_tables": self._upload("hbm_tables", hbm_tables, (layers, rows_dev, width_dev)),
            "hbm_lens": self._upload("hbm_lens", hbm_lens, (layers, rows_dev)),
        }
        self._fetching = bool(per_layer.any()) or self.fetch_all
        if self._fetching:
            self._dense |= {
                "fetch_src": self._upload("fetch_src", fetch_src, (layers, capacity)),
                "fetch_count": self._upload("fetch_count", per_layer[:, None], (layers, 1)),
                "fetch_tables": self._upload("fetch_tables", fetch_tables, (layers, rows_dev, fetch_tables.shape[2])),
                "fetch_lens": self._upload("fetch_lens", take * p, (layers, rows_dev)),
                "fetch_dst": self._arange("fetch_dst", capacity),
                "staging": [self._staging(capacity, f"staging{i}") for i in range(2)],
            }
        self.host.set_lists([_csr(to_cpu[layer], slot[layer]) for layer in range(layers)], rows_dev)
        if self._last_step_s:  # the previous step's host time is known once set_lists has waited for it
            self.balancer.update(self.host.last_busy_fraction(self._last_step_s))
        self._disk_lists = [_csr(on_disk[layer], slot[layer]) for layer in range(layers)] if on_disk.any() else None
        stats, sb = self.stats, pools.slice_bytes
        stats.selected_slices += int(valid.sum()) * layers
        stats.hbm_hits += int(in_hbm.sum())
        for name, mask in (("hbm", in_hbm), ("pcie", to_gpu), ("dram", to_cpu), ("disk", on_disk)):
            stats.bytes_read[name] += int(mask.sum()) * sb
        plan.graph_key = None if on_disk.any() else ("dense", self._generation, self.host.generation, self._fetching)

    def _attend_dense(self, layer: int, q: torch.Tensor, hbm_attention: HbmAttention) -> list:
        d, lens = self._dense, self._dense["hbm_lens"][layer, : q.shape[0]]
        host = self.host.start(layer, q)  # q to the host first: the host works while the GPU does
        parts = [hbm_attention(q, LayerKV(self.hbm_pool, 0, d["hbm_tables"][layer, : q.shape[0]], lens))]
        if self._fetching:
            if layer == 0:  # layers 0 and 1 start now; each later one once its buffer's reader is done
                for first in range(min(2, self.num_layers)):
                    self._start_fetch(first)
            staging = self._wait_fetch(layer)
            fetched = LayerKV(staging, 0, d["fetch_tables"][layer, : q.shape[0]], d["fetch_lens"][layer, : q.shape[0]])
            parts.append(hbm_attention(q, fetched))
            self._release_fetch(layer)
        if self._disk_lists is not None:
            parts.append(self.host.disk_partial(q, self._disk_lists[layer], self.pools))
        if host is not None:
            parts.append(self.host.finish(host))
        return parts

    def _start_fetch(self, layer: int) -> None:
        """Gather `layer`'s PCIe share into staging buffer layer % 2, on the fetch stream (on CUDA), once
        the layer two back has read that buffer: the copy of the next layer overlaps this one's work."""
        d, buf = self._dense, layer % 2
        args = (self.dram_pool, d["staging"][buf], d["fetch_src"][layer], d["fetch_dst"], d["fetch_count"][layer])
        if self._fetch_stream is None:
            copy_slices(*args)
            return
        main = torch.cuda.current_stream(self.device)
        if layer < 2:
            self._fetch_stream.wait_stream(main)  # this step's tables are uploaded
        else:
            self._fetch_stream.wait_event(self._fetch_events[buf][1])
        with torch.cuda.stream(self._fetch_stream):
            copy_slices(*args)
            self._fetch_events[buf][0].record()

    def _wait_fetch(self, layer: int) -> torch.Tensor:
        if self._fetch_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._fetch_events[layer % 2][0])
        return self._dense["staging"][layer % 2]

    def _release_fetch(self, layer: int) -> None:
        if self._fetch_stream is not None:
            self._fetch_events[layer % 2][1].record(torch.cuda.current_stream(self.device))
        if layer + 2 < self.num_layers:
            self._start_fetch(layer + 2)

    def _staging(self, slices: int, name: str = "staging") -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < slices:
            size = max(slices * 5 // 4, 1 if buf is None else buf.shape[0])
            buf = self._buffers[name] = torch.empty(
                (size, *self.pools.slice_shape), dtype=self.dtype, device=self.device
            )
            self._generation += 1
        return buf

    def _arange(self, name: str, n: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n:
            buf = self._buffers[name] = torch.arange(max(n * 5 // 4, 1), dtype=torch.int32, device=self.device)
            self._generation += 1
        return buf

    # -- sparse ------------------------------------------------------------------------------------------

    def _plan_sparse(self, plan: TierPlan, num_pages: np.ndarray) -> None:
        """Selection runs on the device, per layer; the host only fixes the capture's top-k width."""
        budget = sparse_budget_pages(num_pages, self.sparse_budget, self.sink_pages + self.recent_pages)
        self._k_max = 1 << int(max(1, budget.max()) - 1).bit_length()
        self._k_max = min(self._k_max, plan.tables.shape[1])
        if self.sparse_misses == "fetch":  # allocated now, so the graph key below names them
            self._staging(plan.tables.shape[0] * self._k_max)
            self._arange("staged", plan.tables.shape[0] * self._k_max)
        eager = self.pools.used(DISK) > 0 or self.sparse_misses == "cpu" or self.device.type != "cuda"
        plan.graph_key = None if eager else ("sparse", self._k_max, self.sparse_misses, self._generation)

    def _attend_sparse(self, plan: TierPlan, layer: int, q: torch.Tensor, hbm_attention: HbmAttention) -> list:
        p, rows = self.page_size, q.shape[0]
        tables, lens = plan.tables[:rows].long(), plan.lens[:rows].long()
        width = tables.shape[1]
        n = (lens + p - 1) // p
        cols_all = torch.arange(width, device=q.device)[None, :]
        valid = cols_all < n[:, None]
        self._meta_from_decode(layer, tables, lens, n)
        if layer == 0:
            self.importance.candidates(torch.where(valid, tables, self.meta.spare))
        scores = self.meta.score(layer, q, tables, n, self.scale)
        if self.residency_bonus:  # prefer what is already in HBM (locality.RESIDENCY_BONUS says why)
            scores = scores + self.residency_bonus * (self._tier_dev[tables, layer] == HBM)
        forced = (
            (cols_all < torch.clamp(n, max=self.sink_pages)[:, None]) | (cols_all >= (n - self.recent_pages)[:, None])
        ) & valid
        want = torch.ceil(n.float() * self.sparse_budget).long()
        budget = torch.minimum(n, torch.maximum(want, forced.sum(1)))
        cols, chosen = select_pages(scores, forced, valid, budget, self._k_max)
        pages = tables.gather(1, cols)
        self.importance.add(layer, pages, chosen)
        tier = self._tier_dev[pages, layer]
        slot = self._slot_dev[pages, layer]
        is_last = cols == (n - 1)[:, None]
        last_rows = lens - (n - 1) * p
        hbm_tables, hbm_lens, n_hbm = _select(slot, tier == HBM, chosen, is_last, last_rows, p)
        parts = [hbm_attention(q, LayerKV(self.hbm_pool, 0, hbm_tables, hbm_lens))]
        self._counts[:2] += torch.stack((n_hbm.sum(), chosen.sum()))
        if self.dram_pool.shape[0] == 0:  # HBM only: nothing can miss
            return parts
        missed = chosen & (tier != HBM)
        if self.sparse_misses == "cpu" or self.pools.used(DISK):
            parts += self.host.sparse_partials(q, pages, missed, tier, slot, is_last, last_rows, self.pools)
            return parts
        dram_tables, dram_lens, n_dram = _select(slot, tier == DRAM, chosen, is_last, last_rows, p)
        self._counts[2] += n_dram.sum()
        if self.sparse_misses == "gpu":
            parts.append(hbm_attention(q, LayerKV(self.dram_pool, 0, dram_tables, dram_lens)))
        else:  # fetch: gather the selected DRAM slices into staging (one gather), then attend there
            mine = ((tier == DRAM) & chosen).flatten()
            staging = self._staging(rows * self._k_max)
            first = mine.long().argsort(descending=True, stable=True).int()  # the misses, in row order
            src = slot.flatten().int()[first]
            copy_slices(
                self.dram_pool, staging, src, self._arange("staged", rows * self._k_max), mine.sum().int()[None]
            )
            position = (mine.long().cumsum(0) - 1).view(rows, self._k_max).int()  # each miss's staging slot
            order = _tier_order(mine.view(rows, self._k_max), is_last)
            parts.append(hbm_attention(q, LayerKV(staging, 0, position.gather(1, order), dram_lens)))
        return parts

    def _meta_from_decode(self, layer: int, tables: torch.Tensor, lens: torch.Tensor, n: torch.Tensor) -> None:
        """Fold each row's newest key (just written by the executor) into its page's min/max."""
        pos = torch.clamp(lens - 1, min=0)
        page = tables.gather(1, (pos // self.page_size)[:, None])[:, 0]
        page = torch.where(lens > 0, page, self.meta.spare)
        slot = self._slot_dev[page, layer].long()
        k = self.hbm_pool[slot, 0, 0, :, pos % self.page_size]  # [B, Hkv, D]
        self.meta.update(layer, page, k)

    def _meta_from_pages(self, pages: list[int]) -> None:
        """Metadata of pages a prompt chunk wrote, from their keys (every layer of them is in HBM)."""
        if not pages:
            return
        page_ids = torch.tensor(pages, device=self.device)
        slots = self._slot_dev[page_ids].long()  # [n, L]
        keys = self.hbm_pool[slots.flatten(), 0, 0].view(len(pages), self.num_layers, *self.hbm_pool.shape[3:])
        rows = torch.full((len(pages),), self.page_size, device=self.device)
        self.meta.set_from_keys(page_ids, keys, rows)


# -- helpers ---------------------------------------------------------------------------------------------


def _padded(tables: list[list[int]], counts: np.ndarray) -> np.ndarray:
    """[B, max count] int64 logical page ids, -1 past each sequence's pages."""
    out = np.full((len(tables), max(1, int(counts.max(initial=1)))), -1, dtype=np.int64)
    for b, (table, n) in enumerate(zip(tables, counts, strict=True)):
        out[b, :n] = table[:n]
    return out


def _compact(mask: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Per [layer, row], the slots where `mask` holds, packed to the left in column order."""
    out = np.zeros(mask.shape, dtype=np.int64)
    rank = np.cumsum(mask, axis=2) - 1
    layer, row, _ = np.nonzero(mask)
    out[layer, row, rank[mask]] = slot[mask]
    return out


def _csr(mask: np.ndarray, slot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [B + 1] int64, slots int32) of each row's masked slots, in column order."""
    offsets = np.zeros(mask.shape[0] + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(mask.sum(1))
    return offsets, slot[mask].astype(np.int32)


def _tier_order(mine: torch.Tensor, is_last: torch.Tensor) -> torch.Tensor:
    """Column order that puts a row's slices of one tier first, its partial last page at their end."""
    return ((~mine).long() * 2 + is_last.long()).argsort(dim=1, stable=True)


def _select(slot, mine, chosen, is_last, last_rows, page_size):
    """Compact device tables of the chosen slices in one tier (partial last page at the end), their
    token counts and slice counts; no host sync."""
    mine = mine & chosen
    table = slot.gather(1, _tier_order(mine, is_last)).int()
    count = mine.sum(1)
    last_in = (mine & is_last).any(1)
    lens = (count * page_size - last_in * (page_size - last_rows)).int()
    return table, lens, count


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]], out_dtype: torch.dtype) -> torch.Tensor:
    """Merge partials [(out [B, H, D], lse [B, H])] exactly into the attention output."""
    if len(parts) == 1:
        return parts[0][0].to(out_dtype)
    outs = torch.stack([o.float() for o, _ in parts])
    lses = torch.stack([lse.float() for _, lse in parts])
    if outs.is_cuda:
        return merge_attention_states(outs, lses, out_dtype=out_dtype)[0]
    return merge_attention_states_reference(outs, lses)[0].to(out_dtype)
