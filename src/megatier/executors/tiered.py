"""The reference model over a KV cache that spans HBM, DRAM and disk.

The scheduler's page tables hold logical page ids; `TieredKV` maps them to (tier, slot). Each step this
executor:
1. commits finished migrations, gives the pages about to be written HBM slots (new KV is always written
   to HBM), and hands the reference forward pass a batch whose tables name HBM slots, so the model code
   writes K/V exactly as it does without tiers;
2. routes decode attention through kv/attention.py (per-tier partials, exact merge); a prefill chunk
   gathers its context from every tier and runs the reference attention;
3. updates importance, pins sinks and the recent window, and starts this step's migrations.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor, attention
from megatier.kv.attention import MODES, TieredAttention
from megatier.kv.locality import PIN_BONUS, forced_columns, plan_migrations
from megatier.kv.pages import slot_mapping
from megatier.kv.tiers import HBM, TieredKV
from megatier.weights import ModelWeights


class TieredExecutor(ReferenceExecutor):
    name = "tiered"

    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        *,
        tiers: TieredKV,
        mode: str = "dense",
        migrate: bool = True,
        migration_bytes: int | None = None,
        **attention_args,
    ):
        """migrate: run the online placement scheduler (False: pages stay where they were first put, the
        static-placement baselines). migration_bytes: per-step byte budget of migrations."""
        super().__init__(cfg, weights, cache=tiers.hbm)
        self.tiers = tiers
        self.num_pages = tiers.num_pages
        self.allocator = tiers.allocator
        self.attn = TieredAttention(cfg, tiers, mode=mode, **attention_args)
        self.migrate = migrate
        self.migration_bytes = migration_bytes or 2 * max(tiers.reserve[HBM], 1) * tiers.page_bytes
        self._tables = np.zeros(0)

    @property
    def stats(self):
        return self.attn.stats

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        tiers, attn = self.tiers, self.attn
        tiers.poll()
        pages, rows = slot_mapping(batch.page_tables, batch.positions(), self.page_size)
        written = sorted(set(pages))
        tiers.writing = set(written)
        new = tiers.place_new(written)
        tiers.promote_now([p for p in written if tiers.tier[p] != HBM])
        if new:
            new_dev = torch.tensor(new, device=self.device)
            attn.meta.reset(new_dev)
            attn.importance.reset(new_dev)
        self._write_pages = torch.tensor(pages, device=self.device)
        self._write_slots = torch.from_numpy(tiers.slot[pages].astype(np.int64)).to(self.device)
        self._write_rows = torch.tensor(rows, device=self.device)
        self._logical = batch
        self._decode = batch.is_decode()
        if self._decode:
            attn.begin_step(batch)
        hbm_tables = [np.where(tiers.tier[tb] == HBM, tiers.slot[tb], 0).tolist() for tb in batch.page_tables]

        try:
            logits = super().forward(replace(batch, page_tables=hbm_tables))
            if self._decode:
                attn.end_step()
            self._set_priorities(batch)
            if self.migrate:
                attn.stats.migrated_bytes += plan_migrations(tiers, self.migration_bytes)
        finally:
            tiers.writing = set()
        return logits

    def _attention(self, layer_idx: int, q: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if self.attn.mode == "sparse":
            k_new = self.cache.kv[self._write_slots, layer_idx, 0, :, self._write_rows]
            self.attn.meta.update(layer_idx, self._write_pages, k_new)
        if self._decode:
            return self.attn.decode(layer_idx, q)
        return self._gathered_attention(layer_idx, q)

    def _gathered_attention(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        """Prefill: gather each sequence's context from every tier, then the reference attention."""
        batch, cfg = self._logical, self.cfg
        out = torch.empty_like(q)
        offset = 0
        for start, n, table in zip(batch.starts, batch.query_lens, batch.page_tables, strict=True):
            ctx = start + n
            kv = self.tiers.gather_layer(table[: -(-ctx // self.page_size)], layer_idx)
            kv = kv.permute(1, 0, 3, 2, 4).reshape(2, -1, cfg.num_kv_heads, cfg.head_dim)[:, :ctx]
            out[offset : offset + n] = attention(q[offset : offset + n], kv[0], kv[1], start)
            offset += n
        return out

    def _set_priorities(self, batch: StepBatch) -> None:
        """Placement priority: importance, plus a bonus that keeps sinks and recent windows in HBM."""
        tiers, attn = self.tiers, self.attn
        prio = (
            attn.importance.value.cpu().numpy().copy()
            if attn.mode == "sparse"
            else np.zeros(tiers.num_pages, np.float32)
        )
        num_pages = -(-np.array(batch.context_lens) // self.page_size)
        width = int(num_pages.max())
        forced = forced_columns(num_pages, width, attn.sink_pages, attn.recent_pages)
        for b, table in enumerate(batch.page_tables):
            cols = np.flatnonzero(forced[b])
            prio[np.asarray(table)[cols]] += PIN_BONUS
        tiers.priority[:] = prio


def create_tiered_executor(
    backend: str,
    cfg: ModelConfig,
    weights: ModelWeights,
    *,
    dtype: torch.dtype,
    device: torch.device,
    page_size: int,
    hbm_bytes: int,
    dram_bytes: int,
    disk_bytes: int,
    disk_dir: str | None,
    mode: str,
    sparse_budget: float,
) -> TieredExecutor:
    """The executor LLM(kv_hbm=..., kv_dram=..., kv_disk=..., kv_mode=...) runs on."""
    if backend not in ("auto", "reference"):
        raise MegatierError(f"a tiered KV cache runs on backend 'reference' or 'auto', not {backend!r}")
    if mode not in MODES:
        raise MegatierError(f"kv_mode must be 'dense' or 'sparse', not {mode!r}")
    if not 0 < sparse_budget <= 1:
        raise MegatierError(f"kv_sparse_budget is a fraction of the context in (0, 1], not {sparse_budget}")
    if min(hbm_bytes, dram_bytes, disk_bytes) < 0:
        raise MegatierError("kv_hbm, kv_dram and kv_disk must not be negative")
    tiers = TieredKV(
        cfg,
        page_size=page_size,
        dtype=dtype,
        device=device,
        hbm_bytes=hbm_bytes,
        dram_bytes=dram_bytes,
        disk_bytes=disk_bytes,
        disk_dir=disk_dir,
    )
    return TieredExecutor(cfg, weights, tiers=tiers, mode=mode, sparse_fraction=sparse_budget)
