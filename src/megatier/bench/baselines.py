"""Baselines timed in the same process as megatier, on the same weights.

- `hf_decode_step`: Hugging Face transformers `generate` with a static cache (on CUDA, generate
  compiles the decode forward itself, as transformers recommends for that cache).
- `TorchGraphDecoder`: a PyTorch decode step in the style of gpt-fast (fused qkv, a static contiguous
  KV cache, SDPA) captured in one CUDA graph that feeds its argmax back; eager ops (`torch-eager-graph`)
  or, as gpt-fast runs it, compiled by torch.compile with max-autotune (`torch-compile-graph`): Inductor
  fuses the norms, RoPE and activations into Triton kernels and picks GEMM configs, then the CUDA graph
  removes the launch gaps.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatier.config import ModelConfig, rope_inv_freq
from megatier.executors.reference import apply_rope, rms_norm, rope_cos_sin
from megatier.quant.schemes import dequantized
from megatier.weights import ModelWeights, pack_weights


def hf_model(model_path: Path, weights: ModelWeights, device: torch.device, dtype: torch.dtype):
    """A transformers model of the same architecture holding exactly `weights` (quantized ones dequantized)."""
    import transformers

    config_file = model_path if model_path.suffix == ".json" else model_path / "config.json"
    data = json.loads(config_file.read_text())
    family = data["architectures"][0].removesuffix("ForCausalLM")
    config = getattr(transformers, f"{family}Config")(**data)
    with torch.device("meta"):
        model = getattr(transformers, f"{family}ForCausalLM")(config)
    state = {name: dequantized(t.to(device)).to(dtype=dtype) for name, t in weights.tensors()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.device(device):  # RoPE tables are buffers, not weights: build them for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def hf_decode_step(model, prompts: torch.Tensor, output_len: int, repeats: int = 3) -> float:
    """Seconds per decode step of `generate` with a static cache: (time for output_len tokens - time for
    one token) / (output_len - 1), median of `repeats`."""

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(output_len)  # warm-up: generate compiles its decode forward here
    return statistics.median((run(output_len) - run(1)) / (output_len - 1) for _ in range(repeats))


class TorchGraphDecoder:
    """Greedy decode for a batch of equal-length sequences in plain PyTorch over a static KV cache.
    `compile_mode` (e.g. "max-autotune-no-cudagraphs") compiles the step with torch.compile first: one
    decoder layer and the head as two compiled graphs, the layer's reused for every layer (its weights and
    cache are arguments), so Inductor compiles and autotunes one layer instead of unrolling all of them —
    whole-model compilation of Llama-3.2-1B outlasted a 4-minute budget on an H100. Every layer's weights
    and cache are separate tensors, so the compiled layer sees the same strides and offsets each call."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        batch: int,
        max_len: int,
        device,
        dtype,
        compile_mode: str | None = None,
    ):
        self.cfg, self.batch, self.max_len = cfg, batch, max_len
        w = pack_weights(weights, device, dtype)
        self.embed, self.final_norm, self.lm_head = w.embed, w.final_norm, w.lm_head
        names = ("input_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "o", "o_bias", "post_norm")
        names += ("gate_up", "gate_up_bias", "down", "down_bias")
        stacks = [getattr(w, n) for n in names]
        self.layers = [tuple(None if t is None else t[i].clone() for t in stacks) for i in range(cfg.num_layers)]
        del w, stacks
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.context = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._layer, self._head = self._eager_layer, self._eager_head
        if compile_mode is not None:
            self._layer = torch.compile(self._eager_layer, mode=compile_mode, fullgraph=True, dynamic=False)
            self._head = torch.compile(self._eager_head, mode=compile_mode, fullgraph=True, dynamic=False)

    def fill_context(self, length: int, seed: int = 0) -> None:
        """Random K/V for positions < length (decode timing does not depend on their values)."""
        gen = torch.Generator(self.k_cache[0].device).manual_seed(seed)
        for cache in (*self.k_cache, *self.v_cache):
            cache[:, :, :length].normal_(generator=gen)
        self.context = length
        self.pos.fill_(length)

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step at position `pos` for every sequence; the argmax becomes the next input."""
        x = F.embedding(self.tokens, self.embed)
        cos, sin = rope_cos_sin(self.inv_freq, self.pos.expand(self.batch), x.dtype)
        mask = (torch.arange(self.max_len, device=x.device) <= self.pos)[None, None, None, :]
        for layer, weights in enumerate(self.layers):
            x = self._layer(x, weights, self.k_cache[layer], self.v_cache[layer], self.pos, cos, sin, mask)
        self.tokens.copy_(self._head(x))
        self.pos.add_(1)

    def _eager_layer(self, x, weights, k_cache, v_cache, pos, cos, sin, mask) -> torch.Tensor:
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        input_norm, qkv_w, qkv_b, q_norm, k_norm, o_w, o_b, post_norm, gate_up_w, gate_up_b, down_w, down_b = weights
        h = rms_norm(x, input_norm, eps)
        q, k, v = F.linear(h, qkv_w, qkv_b).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(self.batch, cfg.num_heads, cfg.head_dim)
        k = k.view(self.batch, cfg.num_kv_heads, cfg.head_dim)
        if q_norm is not None:
            q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache.index_copy_(2, pos, k[:, :, None])
        v_cache.index_copy_(2, pos, v.view(self.batch, cfg.num_kv_heads, 1, cfg.head_dim))
        attn = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        x = x + F.linear(attn.reshape(self.batch, cfg.q_size), o_w, o_b)
        gate, up = F.linear(rms_norm(x, post_norm, eps), gate_up_w, gate_up_b).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, down_w, down_b)

    def _eager_head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.final_norm, self.cfg.rms_norm_eps), self.lm_head).argmax(-1)

    def capture(self) -> None:
        """Record one step in a CUDA graph; each replay then decodes one more token."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        pos = self.pos.clone()
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside capture (compilation, autotuning, cuBLAS handles)
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.pos.copy_(pos)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self.pos.copy_(pos)

    def replay(self, steps: int) -> None:
        """Decode `steps` tokens from the filled context (each call starts there again)."""
        self.pos.fill_(self.context)
        for _ in range(steps):
            self.graph.replay()
