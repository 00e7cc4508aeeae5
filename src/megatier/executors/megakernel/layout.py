"""Sizes and buffers that the schedule, the CPU interpreter and the CUDA kernel all agree on.

`Dims` is every size an instruction refers to; `StepBuffers` is the mutable per-step state (activations,
counters, token/position/page table) in one place, allocated on the CPU for the interpreter and on the
GPU for the kernel. Weights and the KV cache live elsewhere (weights.PackedWeights, kv.pages.KVCache).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatier.config import ModelConfig, rope_inv_freq
from megatier.executors.megakernel.isa import TILE, Counters

ATTN_CHUNK = 512  # context positions per attention split before another split is added
MAX_SPLITS = 16


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def choose_splits(max_context: int) -> int:
    """Attention splits per (sequence, kv head): long contexts spread over more SMs."""
    return max(1, min(MAX_SPLITS, ceil_div(max_context, ATTN_CHUNK)))


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    layers: int
    batch: int
    splits: int
    page_size: int
    max_pages: int  # page-table width: a sequence can use every page of the cache
    qk_norm: bool = False  # QKV instructions must then cover whole q/k heads (the norm spans a head)

    @classmethod
    def of(cls, cfg: ModelConfig, batch: int, splits: int, page_size: int, max_pages: int) -> Dims:
        return cls(
            hidden=cfg.hidden_size,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            inter=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            layers=cfg.num_layers,
            batch=batch,
            splits=splits,
            page_size=page_size,
            max_pages=max_pages,
            qk_norm=cfg.qk_norm,
        )

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def qkv_heads(self) -> int:
        return self.heads + 2 * self.kv_heads

    @property
    def head_tiles(self) -> int:
        return ceil_div(self.head_dim, TILE)

    @property
    def qkv_tiles(self) -> int:
        return self.qkv_heads * self.head_tiles

    def qkv_tile(self, t: int) -> tuple[int, list[int]]:
        """(head, its dims) of QKV tile t. In q and k heads tile i holds dims [8i, 8i+8) and
        [head_dim/2 + 8i, head_dim/2 + 8i + 8), so every RoPE pair (d, d + head_dim/2) sits in one
        tile; v heads are in natural order. The kernel's packed weights are permuted to match."""
        j, i = divmod(t, self.head_tiles)
        if j >= self.heads + self.kv_heads:
            return j, list(range(i * TILE, (i + 1) * TILE))
        half = self.head_dim // 2
        first = list(range(i * TILE // 2, (i + 1) * TILE // 2))
        return j, first + [half + x for x in first]

    def qkv_permutation(self) -> list[int]:
        """For every packed q|k|v row, the Hugging Face row it holds."""
        return [j * self.head_dim + x for t in range(self.qkv_tiles) for j, dims in [self.qkv_tile(t)] for x in dims]

    def kv_head_of(self, j: int) -> int:
        """The kv group of head j (q heads, then k heads, then v heads)."""
        return j // self.group if j < self.heads else (j - self.heads) % self.kv_heads

    def split_range(self, context: int, s: int) -> tuple[int, int]:
        """Positions [lo, hi) of attention split s: page-aligned pieces, the last ones may be empty."""
        chunk = ceil_div(ceil_div(context, self.splits), self.page_size) * self.page_size
        return min(context, s * chunk), min(context, (s + 1) * chunk)

    @property
    def hidden_tiles(self) -> int:
        return ceil_div(self.hidden, TILE)

    @property
    def inter_tiles(self) -> int:
        return ceil_div(self.inter, TILE)

    @property
    def vocab_tiles(self) -> int:
        return ceil_div(self.vocab, TILE)

    @property
    def counters(self) -> Counters:
        return Counters(self.layers, self.batch, self.kv_heads)


@dataclass
class StepBuffers:
    """Everything a step reads or writes besides weights and KV. Shapes are in the field comments."""

    resid: torch.Tensor  # fp32 [B, hidden]: the residual stream
    q: torch.Tensor  # fp32 [B, q_size]: queries after norm and RoPE
    part_o: torch.Tensor  # fp32 [B, kv_heads, S, group, head_dim]: unnormalized split outputs
    part_ml: torch.Tensor  # fp32 [B, kv_heads, S, group, 2]: split max (log2 units) and sum
    attn_out: torch.Tensor  # weight dtype [B, q_size]: merged attention output
    act: torch.Tensor  # weight dtype [B, inter]: SiLU(gate) * up
    logits: torch.Tensor  # fp32 [B, vocab]
    argmax: torch.Tensor  # int64 [B]: packed (orderable logit bits << 32 | ~index), 0 = empty
    counters: torch.Tensor  # int32 [Counters.size], used as uint32
    state: torch.Tensor  # int32 [4]: epoch, step, abort flag, unused
    tokens: torch.Tensor  # int32 [B]: the token each sequence feeds this step
    pos: torch.Tensor  # int32 [B]: its position
    table: torch.Tensor  # int32 [B, max_pages]: page tables
    out_tokens: torch.Tensor  # int64 [ring rows, B], host memory (pinned with CUDA): step s's tokens in row s % rows

    @classmethod
    def allocate(cls, d: Dims, dtype: torch.dtype, device: torch.device | str, max_steps: int = 1) -> StepBuffers:
        def f32(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        def i32(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int32, device=device)

        b, g = d.batch, d.group
        return cls(
            resid=f32(b, d.hidden),
            q=f32(b, d.q_size),
            part_o=f32(b, d.kv_heads, d.splits, g, d.head_dim),
            part_ml=f32(b, d.kv_heads, d.splits, g, 2),
            attn_out=torch.zeros((b, d.q_size), dtype=dtype, device=device),
            act=torch.zeros((b, d.inter), dtype=dtype, device=device),
            logits=f32(b, d.vocab),
            argmax=torch.zeros(b, dtype=torch.int64, device=device),
            counters=i32(d.counters.size),
            state=i32(4),
            tokens=i32(b),
            pos=i32(b),
            table=i32(b, d.max_pages),
            out_tokens=torch.zeros((max_steps, b), dtype=torch.int64, pin_memory=torch.device(device).type == "cuda"),
        )

    def poison(self) -> None:
        """Fill every activation with NaN so an unwritten element cannot pass a test."""
        for f in ("resid", "q", "part_o", "part_ml", "attn_out", "act", "logits"):
            getattr(self, f).fill_(float("nan"))

    def load(self, token_ids: list[int], positions: list[int], page_tables: list[list[int]]) -> None:
        """Set the step inputs of a decode batch and restart counters and step numbering. Copies come
        from pinned memory on CUDA: from pageable memory the driver first waits for the stream."""
        if any(len(t) > self.table.shape[1] for t in page_tables):
            raise ValueError(f"a page table is longer than the {self.table.shape[1]} pages of the cache")
        b = len(token_ids)
        # Only the columns some table uses: the kernel reads a row's entries below its length, and the
        # full width (every page of the cache) would be B * num_pages words over PCIe each step.
        width = max(1, max(len(t) for t in page_tables))
        ints = torch.zeros(2 * b + self.table.shape[0] * width, dtype=torch.int32)  # tokens | positions | tables
        ints[:b] = torch.tensor(token_ids, dtype=torch.int32)
        ints[b : 2 * b] = torch.tensor(positions, dtype=torch.int32)
        tables = ints[2 * b :].view(self.table.shape[0], width)
        for row, t in enumerate(page_tables):
            tables[row, : len(t)] = torch.tensor(t, dtype=torch.int32)
        if self.table.is_cuda:
            ints = ints.pin_memory()
        self.tokens.copy_(ints[:b], non_blocking=True)
        self.pos.copy_(ints[b : 2 * b], non_blocking=True)
        self.table[:, :width].copy_(ints[2 * b :].view(self.table.shape[0], width), non_blocking=True)
        self.counters.zero_()
        self.state.zero_()
        self.argmax.zero_()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rope_table(cfg: ModelConfig, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """fp32 [max_positions, head_dim/2, 2] of (cos, sin), computed as the reference computes them."""
    inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1).contiguous()
