"""Tiny GGUF files for tests, written the way llama.cpp's converter writes them.

`write_llama_gguf` stores a transformers Llama model with llama.cpp's tensor names, its Q/K row order
and its Llama 3 RoPE divisors, plus a small byte-level BPE tokenizer. Tensors it quantizes (or stores
as F16) are written back into the model, so the model and the file describe exactly the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from tokenizers import pre_tokenizers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Digit merges let a test tell the pre-tokenizers apart: "341234" splits differently under each.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "l l", "he ll", "hell o", "1 2", "12 3", "3 4"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Special tokens, the 256 byte-level characters, then one token per merge; and their llama.cpp types."""
    tokens = SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    return tokens, [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: each head's two RoPE halves interleaved."""
    return w.reshape(n_heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_divisors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3 RoPE scaling."""
    inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    original, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    divisors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(rope["factor"])
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(divisors, dtype=np.float32)


def _store(model_param: torch.Tensor, kind: GGMLQuantizationType) -> np.ndarray:
    """The GGUF payload of `model_param` in `kind`; the parameter takes the stored (rounded) values."""
    data = model_param.detach().float().numpy()
    if kind == GGMLQuantizationType.F32:
        return data
    if kind == GGMLQuantizationType.F16:
        stored = data.astype(np.float16)
        model_param.data.copy_(torch.from_numpy(stored.astype(np.float32)))
        return stored
    try:
        payload = gguf.quants.quantize(data, kind)
    except NotImplementedError:  # a type gguf cannot produce: zero bytes, for tests of unsupported types
        return np.zeros(gguf.quants.quant_shape_to_byte_shape(data.shape, kind), dtype=np.uint8)
    model_param.data.copy_(torch.from_numpy(gguf.quants.dequantize(payload, kind)))
    return payload


def write_llama_gguf(
    path: Path,
    model,
    *,
    pre: str = "smollm",
    arch: str = "llama",
    kinds: dict[str, GGMLQuantizationType] | None = None,
    tokenizer_model: str = "gpt2",
) -> Path:
    """Write `model` (a transformers LlamaForCausalLM, modified in place where `kinds` rounds it) as a GGUF.

    `kinds` maps GGUF tensor names to a storage type (default F32).
    """
    kinds = kinds or {}
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    tokens, types = tiny_vocab()
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        **{
            f"self_attn.{p}_proj.{k}": f"attn_{g}.{k}"
            for p, g in zip("qkvo", ["q", "k", "v", "output"], strict=True)
            for k in ("weight", "bias")
        },
        **{f"mlp.{p}_proj.{k}": f"ffn_{p}.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")},
    }
    for i in range(cfg.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for hf, g in per_layer.items()}
    params = dict(model.named_parameters())
    for hf_name, gguf_name in names.items():
        if hf_name not in params:
            continue
        kind = kinds.get(gguf_name, GGMLQuantizationType.F32)
        payload = _store(params[hf_name], kind)
        if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
            # Quantization blocks never cross rows, so permuting a payload's rows permutes the matrix's.
            n = heads if ".attn_q." in gguf_name else kv_heads
            payload = llama_cpp_permute(torch.from_numpy(payload), n).numpy()
        writer.add_tensor(gguf_name, payload, raw_dtype=kind)
    if cfg.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_divisors(cfg.rope_parameters, head_dim))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
