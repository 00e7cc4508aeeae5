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
from megatier.weights import ModelWeights, at_layer, pack_weights


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
    `compile_mode` (e.g. "max-autotune-no-cudagraphs") compiles the step with torch.compile first."""

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
        self.w = pack_weights(weights, device, dtype)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.context = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._step = self._eager_step
        if compile_mode is not None:
            self._step = torch.compile(self._eager_step, mode=compile_mode, fullgraph=True, dynamic=False)

    def fill_context(self, length: int, seed: int = 0) -> None:
        """Random K/V for positions < length (decode timing does not depend on their values)."""
        gen = torch.Generator(self.k_cache.device).manual_seed(seed)
        for cache in (self.k_cache, self.v_cache):
            cache[:, :, :, :length].normal_(generator=gen)
        self.context = length
        self.pos.fill_(length)

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step at position `pos` for every sequence; the argmax becomes the next input."""
        self._step()

    def _eager_step(self) -> None:
        cfg, w = self.cfg, self.w
        q_size, kv_size, eps = cfg.q_size, cfg.kv_size, cfg.rms_norm_eps
        x = F.embedding(self.tokens, w.embed)
        cos, sin = rope_cos_sin(self.inv_freq, self.pos.expand(self.batch), x.dtype)
        mask = (torch.arange(self.max_len, device=x.device) <= self.pos)[None, None, None, :]
        for layer in range(cfg.num_layers):
            h = rms_norm(x, w.input_norm[layer], eps)
            qkv = F.linear(h, w.qkv[layer], at_layer(w.qkv_bias, layer))
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(self.batch, cfg.num_heads, cfg.head_dim)
            k = k.view(self.batch, cfg.num_kv_heads, cfg.head_dim)
            if w.q_norm is not None:
                q, k = rms_norm(q, w.q_norm[layer], eps), rms_norm(k, w.k_norm[layer], eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[layer].index_copy_(2, self.pos, k[:, :, None])
            self.v_cache[layer].index_copy_(2, self.pos, v.view(self.batch, cfg.num_kv_heads, 1, cfg.head_dim))
            attn = F.scaled_dot_product_attention(
                q[:, :, None], self.k_cache[layer], self.v_cache[layer], attn_mask=mask, enable_gqa=True
            )
            x = x + F.linear(attn.reshape(self.batch, q_size), w.o[layer], at_layer(w.o_bias, layer))
            h = rms_norm(x, w.post_norm[layer], eps)
            gate, up = F.linear(h, w.gate_up[layer], at_layer(w.gate_up_bias, layer)).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down[layer], at_layer(w.down_bias, layer))
        logits = F.linear(rms_norm(x, w.final_norm, eps), w.lm_head)
        self.tokens.copy_(logits.argmax(-1))
        self.pos.add_(1)

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
