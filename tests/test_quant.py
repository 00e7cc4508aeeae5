"""Quantized weights (quant/): GGUF blocks against gguf's own dequantization, the CPU block matmuls
against the dequantized matrices, FP8 quantization and pre-quantized FP8 checkpoints, and the errors.

GGUF payloads are random bytes (every bit pattern of the quants and the packed Q4_K scales occurs) with
finite fp16 scales, and, where gguf can quantize, real quantized matrices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants
from safetensors.torch import load_file, save_file

from conftest import make_hf_model
from megatier import LLM, MegatierError, SamplingParams
from megatier.config import load_config
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor
from megatier.kv.pages import KVCache
from megatier.loader import load_safetensors_weights
from megatier.quant import cpu
from megatier.quant.blocks import (
    FP8_MAX,
    GGUF_BLOCKS,
    QuantWeight,
    cat_rows,
    fp8_from_checkpoint,
    fp8_to_float,
    from_gguf,
    quantize_fp8,
)
from megatier.quant.schemes import apply_quantization
from megatier.weights import MATRIX_FIELDS, pack_weights

KINDS = sorted(GGUF_BLOCKS)


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """n x k weights of `kind` as GGUF stores them: random bytes, the fp16 scales (d, and m / dmin) finite."""
    rng = np.random.default_rng(seed)
    block, size = GGUF_BLOCKS[kind]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    halves = 2 if kind in ("Q4_1", "Q4_K") else 1
    scales = (rng.standard_normal((n, k // block, halves)) * 0.02).astype(np.float16)
    raw[:, :, : 2 * halves] = scales.view(np.uint8).reshape(n, k // block, 2 * halves)
    return raw.reshape(n, k // block * size)


def gguf_dequantized(kind: str, data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[kind]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5, 256), (33, 512)])
def test_dequantize_is_ggufs_bit_for_bit(kind, shape):
    data = random_blocks(kind, *shape)
    w = from_gguf(kind, data, shape, "t")
    assert torch.equal(w.dequantize(), gguf_dequantized(kind, data))
    assert w.nbytes() >= data.nbytes  # the planes hold every byte (Q4_K: its scales unpacked)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quantized_matrices_round_trip(kind):
    m = torch.randn(24, 96, generator=torch.Generator().manual_seed(0)).numpy()
    data = quants.quantize(m, GGMLQuantizationType[kind])
    assert torch.equal(from_gguf(kind, data, (24, 96), "t").dequantize(), gguf_dequantized(kind, data))


def test_row_views_and_gathers_keep_the_numbers():
    data = random_blocks("Q4_K", 12, 256)
    w, full = from_gguf("Q4_K", data, (12, 256), "t"), gguf_dequantized("Q4_K", data)
    assert torch.equal(w.rows(3, 7).dequantize(), full[3:7])
    index = torch.tensor([11, 0, 5, 5])
    assert torch.equal(w.take_rows(index).dequantize(), full[index])


@pytest.mark.parametrize("kind", [*KINDS, "FP8"])
@pytest.mark.parametrize("rows_in", [1, 7])
@pytest.mark.parametrize("path", ["torch", "auto"])
def test_cpu_linear_equals_the_dequantized_matmul(kind, rows_in, path, monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 3000)  # several chunks, the last one short
    if path == "torch":
        monkeypatch.setattr(cpu, "C_MAX_ROWS", 0)  # never the C kernel (tests/test_quant_matmul.py)
    gen = torch.Generator().manual_seed(1)
    n, k = 45, 512
    if kind == "FP8":
        w = quantize_fp8(torch.randn(n, k, generator=gen))
        full = w.dequantize()
    else:
        data = random_blocks(kind, n, k, seed=3)
        w, full = from_gguf(kind, data, (n, k), "t"), gguf_dequantized(kind, data)
    x = torch.randn(2, rows_in, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    ours, theirs = cpu.linear(x, w, bias), F.linear(x.double(), full.double(), bias.double())
    assert ours.shape == (2, rows_in, n) and ours.dtype == torch.float32
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-6
    in_bf16 = cpu.linear(x.bfloat16(), w)
    assert in_bf16.dtype == torch.bfloat16
    assert torch.allclose(in_bf16.float(), F.linear(x.bfloat16().float(), full), rtol=1e-2, atol=1e-2)


def test_cpu_embedding_reads_only_the_rows():
    data = random_blocks("Q8_0", 50, 64)
    w, full = from_gguf("Q8_0", data, (50, 64), "t"), gguf_dequantized("Q8_0", data)
    ids = torch.tensor([[3, 49], [0, 3]])
    assert torch.equal(cpu.embedding(ids, w, torch.float32), full[ids])


def test_from_gguf_refuses_a_payload_of_another_shape():
    with pytest.raises(MegatierError, match=r"tensor 'blk.0.x': Q4_1 data of shape \(4, 40\) does not hold a 4x96"):
        from_gguf("Q4_1", np.zeros((4, 40), np.uint8), (4, 96), "blk.0.x")


# --- FP8 ------------------------------------------------------------------------------------------


def test_fp8_to_float_is_torchs_cast_for_every_finite_code():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    finite = ~codes.float().isnan()
    assert torch.equal(fp8_to_float(codes)[finite], codes.float()[finite])


def test_quantize_fp8_rounds_each_row_to_its_own_scale():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(9, 40, generator=gen) * torch.logspace(-3, 2, 9)[:, None]
    w[4] = 0
    q = quantize_fp8(w.bfloat16(), rows_at_once=4)
    scale = w.bfloat16().float().abs().amax(1) / FP8_MAX
    scale[4] = 1
    assert torch.equal(q.planes["scale"], scale)
    expected = (w.bfloat16().float() / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]
    assert torch.equal(q.dequantize(), expected)
    assert float(((q.dequantize() - w) / w.abs().amax(1, keepdim=True).clamp(min=1e-30)).abs().max()) < 2**-4


def test_fp8_scale_shapes():
    q = torch.randn(6, 8).to(torch.float8_e4m3fn)
    assert torch.equal(fp8_from_checkpoint(q, torch.tensor(0.5), "w").planes["scale"], torch.full((6,), 0.5))
    per_channel = torch.arange(6.0).reshape(6, 1)
    assert torch.equal(fp8_from_checkpoint(q, per_channel, "w").planes["scale"], torch.arange(6.0))
    with pytest.raises(MegatierError, match=r"tensor 'w': weight_scale of shape \(3, 1\) fits neither"):
        fp8_from_checkpoint(q, torch.ones(3, 1), "w")


# --- pre-quantized FP8 checkpoints ----------------------------------------------------------------


def write_fp8_checkpoint(path: Path, per_tensor: set[str] = frozenset()) -> None:
    """Quantize a saved checkpoint's projections in place as an FP8 checkpoint is written (weight +
    weight_scale [N, 1], or one scale for the names in `per_tensor`), embedding and head left in fp32."""
    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        w = tensors[name]
        scale = w.abs().amax() / FP8_MAX if name in per_tensor else w.abs().amax(1, keepdim=True) / FP8_MAX
        tensors[name] = (w / scale).to(torch.float8_e4m3fn)
        tensors[name + "_scale"] = scale.reshape(()) if name in per_tensor else scale
        tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor(1.0)
    save_file(tensors, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(config))


def reference_logits(path: Path, quantization: str = "auto") -> torch.Tensor:
    cfg = load_config(path)
    cache = KVCache.allocate(cfg, 2, page_size=16, dtype=torch.float32, device=torch.device("cpu"))
    executor = ReferenceExecutor(cfg, load_safetensors_weights(path, cfg, quantization), cache=cache)
    return executor.forward(StepBatch([5, 17, 99, 3, 250], [0], [5], [[0, 1]]))[0]


def test_fp8_checkpoint_loads_quantized_and_computes_its_dequantized_model(tmp_path):
    path, _ = make_hf_model(tmp_path / "m", "llama-mqa-untied")
    write_fp8_checkpoint(path, per_tensor={"model.layers.1.mlp.up_proj.weight"})
    weights = load_safetensors_weights(path, load_config(path))
    layer = weights.layers[1]
    assert all(getattr(layer, f).kind == "FP8" for f in MATRIX_FIELDS)
    assert not isinstance(weights.embed, QuantWeight)
    assert torch.equal(layer.up_proj.planes["scale"], layer.up_proj.planes["scale"][:1].expand(96))
    kept, plain = reference_logits(path), reference_logits(path, "none")
    assert float((kept - plain).abs().max() / plain.abs().max()) < 1e-5


def test_quantization_fp8_at_load_stays_close(tmp_path):
    path, _ = make_hf_model(tmp_path / "m", "llama-llama3rope-tied-bias")
    fp8 = load_safetensors_weights(path, load_config(path), "fp8")
    assert fp8.embed is fp8.lm_head and not isinstance(fp8.embed, QuantWeight)  # full precision
    assert all(getattr(layer, f).kind == "FP8" for layer in fp8.layers for f in MATRIX_FIELDS)
    ours, full = reference_logits(path, "fp8"), reference_logits(path)
    assert float((ours - full).abs().max() / full.abs().max()) < 0.1
    assert int(ours.argmax()) == int(full.argmax())


def test_llm_takes_quantization(tmp_path):
    path, _ = make_hf_model(tmp_path / "m", "llama-mqa-untied")
    llm = LLM(str(path), quantization="fp8", kv_cache_gb=0.01)
    assert llm.engine.executor.w.layers[0].down_proj.kind == "FP8"
    assert len(llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) == 3
    with pytest.raises(MegatierError, match="unknown quantization 'int3': expected one of auto, none, fp8"):
        LLM(str(path), quantization="int3")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("scale_shape", r"tensor 'model.layers.0.self_attn.k_proj.weight': weight_scale of shape \(3, 1\) fits"),
        ("no_scale", r"FP8 tensor 'model.layers.0.self_attn.k_proj.weight' has no .*weight_scale"),
        ("block_scale", r"'model.layers.0.self_attn.k_proj.weight' has block-wise FP8 scales"),
        ("method", r"quantization_config.quant_method 'awq' is not supported \(only fp8\)"),
    ],
)
def test_bad_fp8_checkpoints_get_one_line_errors(tmp_path, edit, match):
    path, _ = make_hf_model(tmp_path / "m", "llama-mqa-untied")
    write_fp8_checkpoint(path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    if edit == "scale_shape":
        tensors[name] = torch.ones(3, 1)
    elif edit == "no_scale":
        del tensors[name]
    elif edit == "block_scale":
        tensors[name.replace("_scale", "_scale_inv")] = torch.ones(1, 1)
    save_file(tensors, str(path / "model.safetensors"))
    if edit == "method":
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"]["quant_method"] = "awq"
        (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MegatierError, match=match) as info:
        load_safetensors_weights(path, load_config(path))
    assert "\n" not in str(info.value)


def test_packing_keeps_quantized_matrices_in_their_blocks(tmp_path):
    """The graph executor's packing: q|k|v and gate|up concatenated block by block, FP8's embedding plain;
    `dequantized` (the megakernel's route) gives the plain packed layout of the same values."""
    path, _ = make_hf_model(tmp_path / "m", "llama-mqa-untied")
    fp8 = load_safetensors_weights(path, load_config(path), "fp8")
    packed = pack_weights(fp8, "cpu", torch.float32)
    plain = pack_weights(apply_quantization(fp8, "none"), "cpu", torch.float32)
    assert all(isinstance(m, QuantWeight) and m.kind == "FP8" for m in [*packed.qkv, *packed.gate_up, *packed.down])
    for layer in range(2):
        assert torch.equal(packed.qkv[layer].dequantize(), plain.qkv[layer])
        assert torch.equal(packed.gate_up[layer].dequantize(), plain.gate_up[layer])
    assert torch.equal(packed.qkv[1].dequantize()[:64], fp8.layers[1].q_proj.dequantize())
    assert torch.equal(packed.embed, plain.embed) and torch.equal(packed.lm_head, plain.lm_head)
    assert packed.nbytes() < plain.nbytes() == 4 * fp8.numel() and packed.nbytes() == fp8.nbytes(torch.float32)
    again = fp8.dequantized("cpu", torch.float32)
    assert not again.is_quantized() and torch.equal(pack_weights(again, "cpu", torch.float32).qkv, plain.qkv)


def test_cat_rows_refuses_mixed_kinds():
    a = from_gguf("Q8_0", random_blocks("Q8_0", 4, 64), (4, 64), "a")
    b = from_gguf("Q4_1", random_blocks("Q4_1", 4, 64), (4, 64), "b")
    assert torch.equal(cat_rows([a, a]).dequantize(), torch.cat([a.dequantize()] * 2))
    with pytest.raises(MegatierError, match="not one kind and width"):
        cat_rows([a, b])
