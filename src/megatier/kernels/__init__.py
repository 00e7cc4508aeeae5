"""Triton kernels of the GPU fast path; each also runs on CPU under TRITON_INTERPRET=1 for tests."""

from megatier.kernels.activation import silu_mul
from megatier.kernels.decode_attention import paged_decode_attention
from megatier.kernels.merge import merge_attention_states, merge_attention_states_reference
from megatier.kernels.norm import add_rms_norm
from megatier.kernels.prefill_attention import paged_prefill_attention
from megatier.kernels.rope import rope_append, rope_cos_sin_table

__all__ = [
    "add_rms_norm",
    "merge_attention_states",
    "merge_attention_states_reference",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rope_append",
    "rope_cos_sin_table",
    "silu_mul",
]
