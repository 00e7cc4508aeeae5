"""The reference model: plain PyTorch over the paged KV cache, on CPU or CUDA, in fp32 or bf16.

This is the oracle every fast path is tested against, so it favours clarity over speed: one loop over
layers, one loop over sequences for attention, softmax in fp32. In bf16 it rounds where Hugging Face
transformers rounds (norm outputs, projections, residual), so a bf16 run errs as a plain bf16 PyTorch
run does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatier.config import ModelConfig, rope_inv_freq
from megatier.executors.base import StepBatch
from megatier.kv.pages import KVCache, slot_mapping
from megatier.weights import LayerWeights, ModelWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos/sin [T, head_dim] in the rotate-half convention (pairs i and i + head_dim/2)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of queries at positions start.. over keys at positions 0..

    q [Tq, H, D], k and v [Tk, Hkv, D] with Tk = start + Tq; returns [Tq, H, D] in q's dtype.
    """
    tq, heads, d = q.shape
    kv_heads = k.shape[1]
    qf = q.float().reshape(tq, kv_heads, heads // kv_heads, d)
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.float()) * d**-0.5
    q_pos = torch.arange(start, start + tq, device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float())
    return out.reshape(tq, heads, d).to(q.dtype)


class ReferenceExecutor:
    name = "reference"

    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        *,
        cache: KVCache,
    ):
        self.cfg = cfg
        self.cache = cache
        self.device = cache.kv.device
        self.dtype = cache.kv.dtype
        self.page_size = cache.page_size
        self.num_pages = cache.num_pages
        self.w = weights.to(self.device, self.dtype)
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(self.device)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        cfg, dev = self.cfg, self.device
        tokens = torch.tensor(batch.token_ids, dtype=torch.long, device=dev)
        positions = torch.tensor([p for span in batch.positions() for p in span], device=dev)
        pages, rows = slot_mapping(batch.page_tables, batch.positions(), self.page_size)
        write_pages = torch.tensor(pages, dtype=torch.long, device=dev)
        write_rows = torch.tensor(rows, dtype=torch.long, device=dev)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)

        x = self.w.embed[tokens]
        for layer_idx, layer in enumerate(self.w.layers):
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            q, k, v = self._qkv(layer, h, cos, sin)
            self.cache.kv[write_pages, layer_idx, 0, :, write_rows] = k
            self.cache.kv[write_pages, layer_idx, 1, :, write_rows] = v
            attn = self._attention(layer_idx, q, batch)
            x = x + linear(attn.flatten(1), layer.o_proj, layer.o_bias)
            h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            gate = linear(h, layer.gate_proj, layer.gate_bias)
            up = linear(h, layer.up_proj, layer.up_bias)
            x = x + linear(F.silu(gate) * up, layer.down_proj, layer.down_bias)

        last = torch.tensor(batch.query_lens, device=dev).cumsum(0) - 1
        h = rms_norm(x[last], self.w.final_norm, cfg.rms_norm_eps)
        return linear(h, self.w.lm_head, None).float()

    def _qkv(self, layer: LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cfg = self.cfg
        t = h.shape[0]
        q = linear(h, layer.q_proj, layer.q_bias).view(t, cfg.num_heads, cfg.head_dim)
        k = linear(h, layer.k_proj, layer.k_bias).view(t, cfg.num_kv_heads, cfg.head_dim)
        v = linear(h, layer.v_proj, layer.v_bias).view(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _gather(self, layer_idx: int, tables: list[list[int]], length: int) -> torch.Tensor:
        """K and V of the first `length` positions of each page table: [2, B, length, Hkv, D]."""
        n = -(-length // self.page_size)
        pages = torch.tensor([t[:n] + [t[0]] * (n - len(t[:n])) for t in tables], dtype=torch.long, device=self.device)
        kv = self.cache.kv[pages, layer_idx]  # [B, pages, 2, Hkv, P, D]
        kv = kv.permute(2, 0, 1, 4, 3, 5).reshape(2, len(tables), n * self.page_size, self.cfg.num_kv_heads, -1)
        return kv[:, :, :length]

    def _attention(self, layer_idx: int, q: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Gather each sequence's K/V from its pages and attend; q [T, H, D] -> [T, H, D].

        Prompt chunks attend one by one; single-token (decode) rows attend together, padded to the longest
        context, with every position past a row's length masked out."""
        out = torch.empty_like(q)
        ends = torch.tensor(batch.query_lens).cumsum(0).tolist()
        decode = [i for i, n in enumerate(batch.query_lens) if n == 1]
        for i, (start, n) in enumerate(zip(batch.starts, batch.query_lens, strict=True)):
            if n > 1:
                k, v = self._gather(layer_idx, [batch.page_tables[i]], start + n)[:, 0]
                out[ends[i] - n : ends[i]] = attention(q[ends[i] - n : ends[i]], k, v, start)
        if decode:
            lens = torch.tensor([batch.starts[i] + 1 for i in decode], device=self.device)
            k, v = self._gather(layer_idx, [batch.page_tables[i] for i in decode], int(lens.max()))
            rows = torch.tensor([ends[i] - 1 for i in decode], device=self.device)
            out[rows] = decode_attention(q[rows], k, v, lens)
        return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its first lens[b] keys: q [B, H, D], k and v [B, T, Hkv, D] -> [B, H, D].

    Positions past a sequence's length hold whatever the cache holds (even NaN): their scores become -inf
    and their values 0, so they contribute nothing."""
    b, heads, d = q.shape
    kv_heads = k.shape[2]
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]  # [B, T]
    kf = k.float().masked_fill(~valid[:, :, None, None], 0)
    vf = v.float().masked_fill(~valid[:, :, None, None], 0)
    qf = q.float().reshape(b, kv_heads, heads // kv_heads, d)
    scores = torch.einsum("bhgd,bkhd->bhgk", qf, kf) * d**-0.5
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("bhgk,bkhd->bhgd", probs, vf).reshape(b, heads, d).to(q.dtype)
