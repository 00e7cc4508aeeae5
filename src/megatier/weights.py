"""Model weights in the canonical Hugging Face layout ([out_features, in_features] matrices).

Every loader (safetensors, GGUF, dummy) produces these containers and every executor reads them;
fast executors derive their packed layouts from them. A matrix is a plain tensor or a `QuantWeight`
(quant/blocks.py), kept in its block format: the reference executor multiplies it block by block, the
graph executor's packing keeps it (its kernels decode the blocks in registers), the megakernel
dequantizes it first (`dequantized`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import torch

from megatier.config import ModelConfig
from megatier.quant.blocks import QuantWeight, cat_rows

log = logging.getLogger(__name__)

Matrix = torch.Tensor | QuantWeight
MATRIX_FIELDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    q_proj: Matrix  # [q_size, hidden]
    k_proj: Matrix  # [kv_size, hidden]
    v_proj: Matrix  # [kv_size, hidden]
    o_proj: Matrix  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_proj: Matrix  # [intermediate, hidden]
    up_proj: Matrix  # [intermediate, hidden]
    down_proj: Matrix  # [hidden, intermediate]
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [head_dim] (Qwen3)
    k_norm: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: Matrix  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: Matrix  # [vocab, hidden]; the same object as `embed` when embeddings are tied

    def tensors(self) -> Iterator[tuple[str, Matrix]]:
        """(Hugging Face name, tensor) for every weight, the tied LM head once."""
        yield "model.embed_tokens.weight", self.embed
        for i, layer in enumerate(self.layers):
            for f in fields(LayerWeights):
                t = getattr(layer, f.name)
                if t is not None:
                    yield f"model.layers.{i}.{LAYER_HF_NAMES[f.name]}", t
        yield "model.norm.weight", self.final_norm
        if self.lm_head is not self.embed:
            yield "lm_head.weight", self.lm_head

    def numel(self) -> int:
        return sum(t.numel() for _, t in self.tensors())

    def is_quantized(self) -> bool:
        return any(isinstance(t, QuantWeight) for _, t in self.tensors())

    def quant_kinds(self) -> list[str]:
        """The block formats the matrices are kept in (empty: all plain tensors), for records."""
        return sorted({t.kind for _, t in self.tensors() if isinstance(t, QuantWeight)})

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of the weights held as stored: quantized matrices in their blocks, the rest in `dtype`."""
        return sum(t.nbytes() if isinstance(t, QuantWeight) else t.numel() * dtype.itemsize for _, t in self.tensors())

    def dequantized(self, device: torch.device | str, dtype: torch.dtype) -> ModelWeights:
        """Every quantized matrix as a plain `dtype` tensor on `device`, one at a time (for executors that
        read only plain weights)."""
        if self.is_quantized():
            log.info("dequantizing the quantized matrices to %s", dtype)
        return self.map_matrices(lambda t: t.to(device).dequantize().to(dtype) if isinstance(t, QuantWeight) else t)

    def map_matrices(
        self, fn: Callable[[Matrix], Matrix], embeddings: Callable[[Matrix], Matrix] | None = None
    ) -> ModelWeights:
        """`fn` applied to every projection, `embeddings` (default `fn`) to the embedding and LM head (the
        tie kept); norms and biases stay as they are."""
        embeddings = embeddings or fn
        embed = embeddings(self.embed)
        layers = [replace(layer, **{f: fn(getattr(layer, f)) for f in MATRIX_FIELDS}) for layer in self.layers]
        lm_head = embed if self.lm_head is self.embed else embeddings(self.lm_head)
        return ModelWeights(embed=embed, layers=layers, final_norm=self.final_norm, lm_head=lm_head)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ModelWeights:
        """Cast floating weights to `dtype` on `device`, keeping the tie between embed and lm_head."""

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        embed = cast(self.embed)
        layers = [
            LayerWeights(**{f.name: cast(getattr(layer, f.name)) for f in fields(LayerWeights)})
            for layer in self.layers
        ]
        lm_head = embed if self.lm_head is self.embed else cast(self.lm_head)
        return ModelWeights(embed=embed, layers=layers, final_norm=cast(self.final_norm), lm_head=lm_head)


LAYER_HF_NAMES = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "gate_bias": "mlp.gate_proj.bias",
    "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight the architecture needs, by Hugging Face name."""
    h, i, q, kv, d = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size, cfg.head_dim
    per_layer: dict[str, tuple[int, ...]] = {
        "input_norm": (h,),
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "post_norm": (h,),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }
    if cfg.qkv_bias:
        per_layer |= {"q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,)}
    if cfg.o_bias:
        per_layer["o_bias"] = (h,)
    if cfg.qk_norm:
        per_layer |= {"q_norm": (d,), "k_norm": (d,)}
    if cfg.mlp_bias:
        per_layer |= {"gate_bias": (i,), "up_bias": (i,), "down_bias": (h,)}
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(cfg.num_layers):
        for field_name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{LAYER_HF_NAMES[field_name]}"] = shape
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def weights_from_tensors(cfg: ModelConfig, get: dict[str, torch.Tensor]) -> ModelWeights:
    """Assemble ModelWeights from a name -> tensor mapping whose names and shapes were already checked."""
    layers = []
    for layer in range(cfg.num_layers):
        kwargs = {}
        for field_name, hf_name in LAYER_HF_NAMES.items():
            name = f"model.layers.{layer}.{hf_name}"
            if name in get:
                kwargs[field_name] = get[name]
        layers.append(LayerWeights(**kwargs))
    embed = get["model.embed_tokens.weight"]
    lm_head = embed if cfg.tie_word_embeddings else get["lm_head.weight"]
    return ModelWeights(embed=embed, layers=layers, final_norm=get["model.norm.weight"], lm_head=lm_head)


Stacked = torch.Tensor | list[Matrix]


@dataclass
class PackedWeights:
    """Per-layer weights stacked along a leading layer axis, the layout every GPU executor reads.

    qkv rows are q | k | v (Hugging Face head order, RoPE in rotate-half pairs), gate_up rows are
    gate | up. Optional tensors are None when the architecture lacks them. With quantized matrices the
    four projections are lists, one matrix per layer (a QuantWeight, or a plain tensor where a layer's
    fused parts are not all of one kind); `[layer]` reads either form.
    """

    embed: Matrix  # [vocab, hidden]
    qkv: Stacked  # [L, q_size + 2 * kv_size, hidden]
    o: Stacked  # [L, hidden, q_size]
    gate_up: Stacked  # [L, 2 * intermediate, hidden]
    down: Stacked  # [L, hidden, intermediate]
    input_norm: torch.Tensor  # [L, hidden]
    post_norm: torch.Tensor  # [L, hidden]
    final_norm: torch.Tensor  # [hidden]
    lm_head: Matrix  # [vocab, hidden], the same storage as embed when tied
    qkv_bias: torch.Tensor | None = None  # [L, q_size + 2 * kv_size]
    o_bias: torch.Tensor | None = None  # [L, hidden]
    gate_up_bias: torch.Tensor | None = None  # [L, 2 * intermediate]
    down_bias: torch.Tensor | None = None  # [L, hidden]
    q_norm: torch.Tensor | None = None  # [L, head_dim]
    k_norm: torch.Tensor | None = None  # [L, head_dim]

    def nbytes(self) -> int:
        """Bytes held, the tied LM head once: about what a decode step streams."""
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "lm_head" and value is self.embed):
                continue
            for t in value if isinstance(value, list) else [value]:
                total += t.nbytes() if isinstance(t, QuantWeight) else t.numel() * t.element_size()
        return total


def pack_weights(w: ModelWeights, device: torch.device | str, dtype: torch.dtype) -> PackedWeights:
    """Stack and concatenate once, on `device`, in `dtype` (norm weights and biases too). Quantized
    matrices stay in their blocks (moved to `device`); a fused group (q|k|v, gate|up) whose parts are
    not all of one kind is dequantized to `dtype`, logged once."""
    mixed: set[str] = set()

    def fuse(name: str, parts: list[Matrix]) -> Matrix:
        if all(isinstance(p, torch.Tensor) for p in parts):
            return torch.cat(parts).to(device=device, dtype=dtype)
        if len({p.kind if isinstance(p, QuantWeight) else None for p in parts}) == 1:
            return cat_rows([p.to(device) for p in parts])
        mixed.add(name)
        return torch.cat(
            [p.to(device).dequantize().to(dtype) if isinstance(p, QuantWeight) else p.to(device, dtype) for p in parts]
        )

    def stack(get) -> torch.Tensor | None:
        parts = [get(layer) for layer in w.layers]
        if parts[0] is None:
            return None
        return torch.stack([p.to(device=device, dtype=dtype) for p in parts])

    def matrices(name: str, *names: str) -> Stacked:
        if not w.is_quantized():
            return stack(cat(*names))
        return [fuse(name, [getattr(layer, n) for n in names]) for layer in w.layers]

    def cat(*names: str):
        def get(layer: LayerWeights):
            parts = [getattr(layer, n) for n in names]
            return None if parts[0] is None else parts[0] if len(parts) == 1 else torch.cat(parts)

        return get

    embed = w.embed.to(device=device, dtype=dtype)
    packed = PackedWeights(
        embed=embed,
        qkv=matrices("qkv", "q_proj", "k_proj", "v_proj"),
        o=matrices("o", "o_proj"),
        gate_up=matrices("gate_up", "gate_proj", "up_proj"),
        down=matrices("down", "down_proj"),
        input_norm=stack(lambda layer: layer.input_norm),
        post_norm=stack(lambda layer: layer.post_norm),
        final_norm=w.final_norm.to(device=device, dtype=dtype),
        lm_head=embed if w.lm_head is w.embed else w.lm_head.to(device=device, dtype=dtype),
        qkv_bias=stack(cat("q_bias", "k_bias", "v_bias")),
        o_bias=stack(lambda layer: layer.o_bias),
        gate_up_bias=stack(cat("gate_bias", "up_bias")),
        down_bias=stack(lambda layer: layer.down_bias),
        q_norm=stack(lambda layer: layer.q_norm),
        k_norm=stack(lambda layer: layer.k_norm),
    )
    if mixed:
        log.info(
            "packing weights: %s mix block kinds in some layer; those layers dequantized to %s",
            ", ".join(sorted(mixed)),
            dtype,
        )
    return packed


def at_layer(stacked: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    """One layer's slice of an optional stacked PackedWeights tensor (None stays None)."""
    return None if stacked is None else stacked[layer]
