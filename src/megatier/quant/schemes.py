"""The `quantization` load option: what becomes of a checkpoint's matrices once loaded.

auto  as stored: GGUF Q8_0/Q4_0/Q4_1/Q4_K blocks and FP8 checkpoints stay quantized, float weights float;
none  every quantized matrix dequantized to fp32: the numbers the old GGUF conversion cache held, the
      oracle the kept-quantized path is compared with;
fp8   every projection as FP8 e4m3 with one scale per output channel, from its full-precision values (a
      GGUF block matrix is dequantized first, one matrix at a time); the embedding and LM head in full
      precision, as vLLM keeps them: on the embedded SmolLM2 an FP8 LM head alone doubles the NLL cost
      (scripts/quant_accuracy.py, docs/PERF.md).
"""

from __future__ import annotations

from megatier.errors import MegatierError
from megatier.quant.blocks import QuantWeight, quantize_fp8
from megatier.weights import Matrix, ModelWeights

QUANTIZATIONS = ("auto", "none", "fp8")


def dequantized(t: Matrix) -> Matrix:
    return t.dequantize() if isinstance(t, QuantWeight) else t


def to_fp8(t: Matrix) -> QuantWeight:
    if isinstance(t, QuantWeight):
        return t if t.kind == "FP8" else quantize_fp8(t.dequantize())
    return quantize_fp8(t)


def apply_quantization(weights: ModelWeights, quantization: str) -> ModelWeights:
    if quantization not in QUANTIZATIONS:
        raise MegatierError(f"unknown quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return weights.map_matrices(dequantized)
    if quantization == "fp8":
        return weights.map_matrices(to_fp8, embeddings=dequantized)
    return weights
