"""ModelConfig: the architecture facts every executor needs, read from a Hugging Face config.json.

Only decoder-only Llama-family models are supported; their differences are a few flags:
Llama (optional attention/MLP biases, llama3 RoPE scaling), Qwen2 (q/k/v biases), Qwen3 (RMSNorm on q and k).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatier.errors import MegatierError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype, where: str = "") -> torch.dtype:
    """Map a dtype name ("bfloat16", "torch.float32", ...) to a torch dtype, or fail naming `where` it came from."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        prefix = f"{where}: " if where else ""
        raise MegatierError(f"{prefix}unknown dtype {name!r}: expected one of float32, bfloat16, float16")
    return DTYPES[key]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency settings. `kind` is one of ROPE_TYPES."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32  # the checkpoint's own dtype

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.kv_size * torch.finfo(dtype).bits // 8


def _get(d: dict[str, Any], key: str, source: str, kind: type = int) -> Any:
    if key not in d or d[key] is None:
        raise MegatierError(f"{source}: missing field {key!r}")
    value = d[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise MegatierError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
        raise MegatierError(f"{source}: field {key!r} must be a positive number, got {value!r}")
    return value


def _rope_from_hf(d: dict[str, Any], source: str) -> RopeScaling:
    # transformers 5 writes "rope_parameters"; older checkpoints write "rope_theta" + "rope_scaling".
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise MegatierError(
            f"{source}: unsupported rope type {kind!r} (field rope_scaling/rope_parameters); "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise MegatierError(f"{source}: field 'rope_theta' must be a positive number, got {theta!r}")
    rope = RopeScaling(theta=float(theta), kind=kind)
    if kind == "linear":
        rope = RopeScaling(theta=float(theta), kind=kind, factor=float(_get(merged, "factor", source, float)))
    elif kind == "llama3":
        rope = RopeScaling(
            theta=float(theta),
            kind=kind,
            factor=float(_get(merged, "factor", source, float)),
            low_freq_factor=float(_get(merged, "low_freq_factor", source, float)),
            high_freq_factor=float(_get(merged, "high_freq_factor", source, float)),
            original_max_position=int(_get(merged, "original_max_position_embeddings", source)),
        )
    return rope


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed Hugging Face config.json; errors name `source` and the field."""
    archs = d.get("architectures") or []
    arch_name = next((a for a in archs if a in ARCHITECTURES), None)
    if arch_name is None:
        got = ", ".join(archs) if archs else f"model_type={d.get('model_type')!r}"
        raise MegatierError(f"{source}: unsupported architecture {got}; supported: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[arch_name]
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise MegatierError(f"{source}: unsupported hidden_act {act!r}; only 'silu' is supported")
    if arch == "qwen2" and d.get("use_sliding_window"):
        raise MegatierError(f"{source}: use_sliding_window=true is not supported")
    hidden = _get(d, "hidden_size", source)
    heads = _get(d, "num_attention_heads", source)
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or hidden // heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise MegatierError(
            f"{source}: num_key_value_heads={kv_heads!r} must be a positive divisor of num_attention_heads={heads}"
        )
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    attention_bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=_get(d, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_get(d, "intermediate_size", source),
        num_layers=_get(d, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(d, source),
        max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else attention_bias,
        o_bias=False if arch == "qwen2" else attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)) if arch == "llama" else False,
        qk_norm=arch == "qwen3",
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        dtype=parse_dtype(d.get("dtype") or d.get("torch_dtype") or "float32", f"{source} field 'dtype'"),
    )


def load_config(model: Path) -> ModelConfig:
    """Read a model directory's config.json, or a config .json file itself (built-in shapes)."""
    path = model if model.suffix == ".json" else model / "config.json"
    if not path.is_file():
        raise MegatierError(f"{path}: file not found (a Hugging Face model directory needs config.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegatierError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(data, str(path))


def rope_inv_freq(rope: RopeScaling, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (fp32, [head_dim/2]) including linear or llama3 scaling.

    Computed in fp32 exactly as Hugging Face does, so positions in the thousands agree to the last bit.
    """
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq
