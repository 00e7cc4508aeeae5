"""Load a model: a Hugging Face directory (safetensors, memory-mapped), a GGUF file, or dummy weights.

`resolve_model` turns what the user named (nothing, a directory, a .gguf file) into a Hugging Face
directory; GGUF files, the embedded default model included, are converted once into the user cache
(their Q8_0/Q4 tensors stay in the GGUF and load as QuantWeight). FP8 checkpoints
(quantization_config.quant_method "fp8", `weight` + `weight_scale` as vLLM reads them) load as FP8
QuantWeights; `quantization` (quant/schemes.py) may then dequantize or requantize every matrix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from megatier.config import ModelConfig
from megatier.errors import MegatierError
from megatier.quant.blocks import QuantWeight, fp8_from_checkpoint
from megatier.quant.schemes import apply_quantization
from megatier.weights import Matrix, ModelWeights, expected_shapes, weights_from_tensors

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


@dataclass
class GenerationDefaults:
    """What generation_config.json says: EOS ids and default sampling settings."""

    eos_token_ids: tuple[int, ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)


BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.json"))


def resolve_model(model: str | Path | None) -> Path:
    """What to load for `model`: a Hugging Face directory, or a built-in shape's config .json (dummy
    weights only). None means the embedded default model; GGUF files are converted once and cached."""
    if model is None:
        return _gguf_dir(None)
    path = Path(model).expanduser()
    if not path.exists() and str(model) in builtin_config_names():
        return BUILTIN_CONFIGS / f"{model}.json"
    if not path.exists():
        raise MegatierError(
            f"{path}: no such file or directory (expected a model directory, a .gguf file, or a built-in "
            f"shape for load_format='dummy': {', '.join(builtin_config_names())})"
        )
    if path.is_file():
        if path.suffix.lower() == ".json":
            return path
        if path.suffix.lower() != ".gguf":
            raise MegatierError(f"{path}: a model file must be .gguf or a config .json; otherwise pass the directory")
        return _gguf_dir(path)
    return path


def _gguf_dir(path: Path | None) -> Path:
    """The cached Hugging Face conversion of a GGUF file (None: the embedded default model)."""
    from megatier import gguf_import  # imported only when a GGUF file is involved

    return gguf_import.cached_gguf_dir(path or gguf_import.default_gguf_path())


def load_generation_defaults(model_dir: Path, cfg: ModelConfig) -> GenerationDefaults:
    path = (
        model_dir.with_name("generation_config.json")
        if model_dir.suffix == ".json"
        else model_dir / "generation_config.json"
    )
    if not path.is_file():
        return GenerationDefaults(eos_token_ids=cfg.eos_token_ids)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegatierError(f"{path}: not valid JSON ({e})") from None
    eos = data.get("eos_token_id", list(cfg.eos_token_ids))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
    sampling = {}
    if data.get("do_sample") is not False:
        sampling = {k: data[k] for k in ("temperature", "top_p", "top_k", "min_p") if data.get(k) is not None}
    return GenerationDefaults(eos_token_ids=eos_ids, sampling=sampling)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MegatierError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise MegatierError(f"{f}: file not found (named by {index.name})")
        return files
    if single.is_file():
        return [single]
    raise MegatierError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json (use load_format='dummy' "
        "for random weights)"
    )


def _open_tensors(files: list[Path]) -> dict[str, tuple[Path, torch.Tensor]]:
    """Every tensor of every file as a zero-copy view of the memory-mapped file."""
    tensors: dict[str, tuple[Path, torch.Tensor]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensors[name] = (path, f.get_tensor(name))
        except (SafetensorError, OSError, ValueError) as e:
            raise MegatierError(f"{path}: truncated or corrupt safetensors file ({e})") from None
    return tensors


def _checkpoint_quantization(model_dir: Path) -> str | None:
    """config.json's quantization_config.quant_method: None or "fp8"; any other method is refused."""
    config = json.loads((model_dir / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in (None, "fp8"):
        raise MegatierError(f"{model_dir}: quantization_config.quant_method {method!r} is not supported (only fp8)")
    return method


def load_safetensors_weights(model_dir: Path, cfg: ModelConfig, quantization: str = "auto") -> ModelWeights:
    """Check every tensor's name, shape and dtype against the config; return memory-mapped views (a
    converted GGUF's kept-quantized tensors read from the GGUF), then apply `quantization`."""
    tensors = _open_tensors(_safetensors_files(model_dir))
    shapes = expected_shapes(cfg)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    quantized: dict[str, Matrix] = {}
    if model_dir.is_dir() and (model_dir / "gguf_tensors.json").is_file():
        from megatier.gguf_import import quantized_tensors

        quantized = quantized_tensors(model_dir, cfg.num_heads, cfg.num_kv_heads)
    fp8 = _checkpoint_quantization(model_dir) == "fp8"
    checked: dict[str, Matrix] = {}
    used: set[str] = set()
    for name, shape in shapes.items():
        if name in quantized:
            checked[name] = quantized[name]
            if checked[name].shape != shape:
                raise MegatierError(f"{model_dir}: tensor {name!r} has shape {checked[name].shape}, expected {shape}")
            continue
        if name not in tensors:
            raise MegatierError(f"{model_dir}: tensor {name!r} missing from the safetensors files")
        path, t = tensors[name]
        used.add(name)
        if tuple(t.shape) != shape:
            raise MegatierError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}")
        if fp8 and t.dtype == torch.float8_e4m3fn:
            checked[name] = _fp8_weight(path, name, t, tensors)
            used |= {f"{name}_scale", name.removesuffix("weight") + "input_scale"}
            continue
        if not t.is_floating_point() or t.element_size() == 1:
            raise MegatierError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        checked[name] = t
    unused = sorted(n for n in tensors if n not in used and "rotary_emb" not in n)
    if unused:
        log.warning(
            "%s: ignoring %d tensors the architecture does not use, e.g. %s",
            model_dir,
            len(unused),
            unused[0],
        )
    return apply_quantization(weights_from_tensors(cfg, checked), quantization)


def _fp8_weight(
    path: Path, name: str, weight: torch.Tensor, tensors: dict[str, tuple[Path, torch.Tensor]]
) -> QuantWeight:
    """An FP8 checkpoint's weight with its per-tensor or per-channel `weight_scale` (activations stay bf16/fp32:
    a static `input_scale` is not used)."""
    if f"{name}_scale_inv" in tensors:
        raise MegatierError(f"{path}: tensor {name!r} has block-wise FP8 scales (weight_scale_inv): not supported")
    if f"{name}_scale" not in tensors:
        raise MegatierError(f"{path}: FP8 tensor {name!r} has no {name}_scale")
    try:
        return fp8_from_checkpoint(weight, tensors[f"{name}_scale"][1], name)
    except MegatierError as e:
        raise MegatierError(f"{path}: {e}") from None


def dummy_weights(cfg: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """Seeded random weights with a sane scale (never zeros), generated on `device` for speed.

    Matrices are N(0, 1/sqrt(fan_in)) so activations neither vanish nor explode through many layers;
    norms are around 1 and biases small, so every term of the forward pass matters. Embeddings and the LM
    head are N(0, 0.1): small enough that the layers, not the input embedding, dominate the last hidden
    state (with tied embeddings a larger scale makes the model repeat its input token forever), large
    enough that logits spread over a few units, so greedy choices have real margins and real variety.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.empty(shape, dtype=torch.float32, device=device)
        if name.endswith("norm.weight"):
            t.uniform_(0.8, 1.2, generator=gen)
        elif name.endswith(".bias"):
            t.normal_(0.0, 0.02, generator=gen)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            t.normal_(0.0, 0.1, generator=gen)
        else:
            t.normal_(0.0, shape[1] ** -0.5, generator=gen)
        out[name] = t.to(dtype)
    return weights_from_tensors(cfg, out)


def load_weights(
    model_path: Path,
    cfg: ModelConfig,
    *,
    load_format: str,
    quantization: str,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> ModelWeights:
    """The weights `LLM` runs (and every tensor-parallel worker loads for itself): the checkpoint at the
    resolved `model_path`, or seeded dummy weights, then the `quantization` option."""
    if load_format == "dummy":
        return apply_quantization(dummy_weights(cfg, seed, dtype, device), quantization)
    if model_path.suffix == ".json":
        raise MegatierError(f"{model_path.stem!r} is a built-in shape without weights: use load_format='dummy'")
    return load_safetensors_weights(model_path, cfg, quantization)
