"""Toy models and KV setups shared by the megakernel tests (CPU interpreter and GPU kernel)."""

from __future__ import annotations

import torch

from megatier.config import ModelConfig, RopeScaling
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.loader import dummy_weights

LLAMA3_ROPE = RopeScaling(
    theta=500000.0, kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64
)

# Every architecture flag the megakernel handles, on tiny shapes (hidden 64, 2 layers).
TOY = {
    "llama-tied-bias": dict(
        architecture="llama",
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope=LLAMA3_ROPE,
        tie_word_embeddings=True,
        o_bias=True,
        qkv_bias=True,
        mlp_bias=True,
    ),
    "llama-mqa": dict(architecture="llama", num_heads=4, num_kv_heads=1, head_dim=16),
    "qwen2": dict(architecture="qwen2", num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True),
    "qwen3": dict(architecture="qwen3", num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True),
}


def toy_config(case: str, vocab: int = 300) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2, rms_norm_eps=1e-5, **TOY[case]
    )


def llama_1b_config() -> ModelConfig:
    """Llama-3.2-1B's shapes and RoPE, for dummy weights."""
    rope = RopeScaling(
        theta=500000.0,
        kind="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position=8192,
    )
    return ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope=rope,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        dtype=torch.bfloat16,
    )


def page_tables(lengths: list[int], page_size: int, num_pages: int, seed: int = 0) -> list[list[int]]:
    """Shuffled, disjoint pages so sequences never sit in neighbouring or ordered pages."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    tables, at = [], 0
    for n in lengths:
        k = -(-n // page_size)
        tables.append(perm[at : at + k])
        at += k
    return tables


def garbage_kv(cache: KVCache, seed: int = 1) -> None:
    """Huge values everywhere: any read of a position nobody wrote shows up in the result."""
    gen = torch.Generator(device=cache.kv.device).manual_seed(seed)
    cache.kv.normal_(0.0, 100.0, generator=gen)


def prefill(cfg, weights, cache: KVCache, prompts: list[list[int]], tables: list[list[int]]) -> None:
    """Write the prompts' KV (all tokens but the last of each) with the reference model."""
    ref = ReferenceExecutor(cfg, weights, cache=cache)
    batch = StepBatch(
        token_ids=[t for p in prompts for t in p[:-1]],
        starts=[0] * len(prompts),
        query_lens=[len(p) - 1 for p in prompts],
        page_tables=tables,
    )
    ref.forward(batch)


def decode_batch(prompts: list[list[int]], tables: list[list[int]]) -> StepBatch:
    """The decode step after `prefill`: each sequence feeds its last prompt token."""
    return StepBatch(
        token_ids=[p[-1] for p in prompts],
        starts=[len(p) - 1 for p in prompts],
        query_lens=[1] * len(prompts),
        page_tables=tables,
    )


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


__all__ = [
    "decode_batch",
    "dummy_weights",
    "garbage_kv",
    "llama_1b_config",
    "page_tables",
    "prefill",
    "random_prompts",
    "toy_config",
]
