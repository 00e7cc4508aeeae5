"""The reference model: plain PyTorch over the paged KV cache, on CPU or CUDA, in fp32 or bf16.

This is the oracle every fast path is tested against, so it favours clarity over speed: one loop over
layers, one loop over sequences for attention, softmax in fp32. In bf16 it rounds where Hugging Face
transformers rounds (norm outputs, projections, residual), so a bf16 run errs as a plain bf16 PyTorch
run does. Quantized matrices (quant/) stay in their block formats: every matmul and the embedding go
through quant/cpu.py, which dequantizes a cache-sized chunk at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatier.config import ModelConfig, rope_inv_freq
from megatier.executors.base import StepBatch
from megatier.kv.pages import block_table_tensor
from megatier.kv.store import KVStore, LayerKV
from megatier.parallel import Shard
from megatier.quant import cpu as quant_cpu
from megatier.weights import LayerWeights, Matrix, ModelWeights


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


def linear(x: torch.Tensor, w: Matrix, b: torch.Tensor | None) -> torch.Tensor:
    return quant_cpu.linear(x, w, b)


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

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, cache: KVStore, shard: Shard | None = None):
        """With a `shard`, `cfg`, `weights` and `cache` are this rank's share (parallel.py) and `forward`
        all-reduces after attention and the MLP and returns the gathered logits."""
        self.cfg = cfg
        self.shard = shard
        self.cache = cache
        self.device = cache.device
        self.dtype = cache.dtype
        self.page_size = cache.page_size
        self.num_pages = cache.num_pages
        self.w = weights.to(self.device, self.dtype)
        self.weight_bytes = self.w.nbytes(self.dtype)
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(self.device)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        cfg, dev, store = self.cfg, self.device, self.cache
        tokens = batch.token_tensor(dev)
        positions = torch.tensor([p for span in batch.positions() for p in span], device=dev)
        seq_of_token = torch.repeat_interleave(torch.arange(batch.num_seqs), torch.tensor(batch.query_lens)).to(dev)
        tables = block_table_tensor(batch.page_tables, dev)
        lens = torch.tensor(batch.context_lens, dtype=torch.int32, device=dev)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)
        plan = store.begin_step(batch, tables, lens)

        x = quant_cpu.embedding(tokens, self.w.embed, self.dtype)
        for layer_idx, layer in enumerate(self.w.layers):
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            q, k, v = self._qkv(layer, h, cos, sin)
            where = store.layer_kv(plan, layer_idx)
            slots = where.tables[seq_of_token, positions // self.page_size].long()
            rows = positions % self.page_size
            where.pool[slots, where.layer, 0, :, rows] = k
            where.pool[slots, where.layer, 1, :, rows] = v
            if batch.is_decode():
                attn = store.attend(plan, layer_idx, q, self.hbm_attention)
            else:
                attn = self._prompt_attention(store.context(plan, layer_idx), q, batch)
            x = x + self._row_parallel(attn.flatten(1), layer.o_proj, layer.o_bias)
            h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            x = x + self._row_parallel(self._mlp_hidden(layer, h), layer.down_proj, layer.down_bias)
        store.end_step(plan)

        h = rms_norm(x[self._logit_rows(batch)], self.w.final_norm, cfg.rms_norm_eps)
        logits = linear(h, self.w.lm_head, None).float()
        return logits if self.shard is None else self.shard.gather_vocab(logits, cfg.vocab_size)

    def _row_parallel(self, x: torch.Tensor, w: Matrix, b: torch.Tensor | None) -> torch.Tensor:
        """o and down: sharded, each rank's product is a partial sum; the bias goes in once, after the sum."""
        if self.shard is None:
            return linear(x, w, b)
        out = self.shard.all_reduce(linear(x, w, None))
        return out if b is None else out + b

    def _logit_rows(self, batch: StepBatch) -> torch.Tensor:
        """Indices of the new tokens whose logits `forward` returns (StepBatch.logit_counts)."""
        rows, end = [], 0
        for i, n in enumerate(batch.query_lens):
            rows += range(end if i in batch.all_logits else end + n - 1, end + n)
            end += n
        return torch.tensor(rows, device=self.device)

    def _qkv(self, layer: LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cfg = self.cfg
        t = h.shape[0]
        q, k, v = self._project_qkv(layer, h)
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _project_qkv(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(
            linear(h, w, b)
            for w, b in ((layer.q_proj, layer.q_bias), (layer.k_proj, layer.k_bias), (layer.v_proj, layer.v_bias))
        )

    def _mlp_hidden(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """What the down projection reads: silu(gate) * up."""
        return F.silu(linear(h, layer.gate_proj, layer.gate_bias)) * linear(h, layer.up_proj, layer.up_bias)

    def _causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        return attention(q, k, v, start)

    def _gather(self, where: LayerKV, length: int) -> torch.Tensor:
        """K and V of the first `length` positions of each row of `where`: [2, B, length, Hkv, D], on the
        pool's device (a host pool is read where it is)."""
        n = -(-length // self.page_size)
        # Entries past a row's length may be anything (compact tables): clamp them to a real slot.
        pages = where.tables[:, :n].long().clamp(0, where.pool.shape[0] - 1).to(where.pool.device)
        kv = where.pool[pages, where.layer]  # [B, pages, 2, Hkv, P, D]
        kv = kv.permute(2, 0, 1, 4, 3, 5).reshape(2, pages.shape[0], n * self.page_size, self.cfg.num_kv_heads, -1)
        return kv[:, :, :length]

    def hbm_attention(self, q: torch.Tensor, where: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """One query per row over its first lens[b] positions of `where` (kv/store.py's HbmAttention)."""
        length = max(int(where.lens.max()), 1) if where.lens.numel() else 1
        k, v = self._gather(where, length).to(q.device)
        return decode_attention(q, k, v, where.lens.to(q.device), with_lse=True)

    def _prompt_attention(self, where: LayerKV, q: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Each sequence's new tokens over its whole context; q [T, H, D] -> [T, H, D]."""
        out = torch.empty_like(q)
        end = 0
        for i, (start, n) in enumerate(zip(batch.starts, batch.query_lens, strict=True)):
            if n == 0:
                continue
            row = LayerKV(where.pool, where.layer, where.tables[i : i + 1], where.lens[i : i + 1])
            k, v = self._gather(row, start + n)[:, 0].to(q.device)
            out[end : end + n] = self._causal_attention(q[end : end + n], k, v, start)
            end += n
        return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, with_lse: bool = False):
    """One query per sequence over its first lens[b] keys: q [B, H, D], k and v [B, T, Hkv, D] -> [B, H, D]
    (and with `with_lse` the natural-log softmax denominator [B, H] fp32; -inf and output 0 where lens is 0).

    Positions past a sequence's length hold whatever the cache holds (even NaN): their scores become -inf
    and their values 0, so they contribute nothing."""
    b, heads, d = q.shape
    kv_heads = k.shape[2]
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]  # [B, T]
    kf = k.float().masked_fill(~valid[:, :, None, None], 0)
    vf = v.float().masked_fill(~valid[:, :, None, None], 0)
    qf = q.float().reshape(b, kv_heads, heads // kv_heads, d)
    scores = torch.einsum("bhgd,bkhd->bhgk", qf, kf) * d**-0.5
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # a row without keys: all -inf, output 0
    out = torch.einsum("bhgk,bkhd->bhgd", probs, vf).reshape(b, heads, d).to(q.dtype)
    if not with_lse:
        return out
    return out, torch.logsumexp(scores, dim=-1).reshape(b, heads)
