"""Shared fixtures. Without CUDA, Triton kernels run in the interpreter (set before triton is imported)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests convert the embedded GGUF once per machine into a cache of their own, not the user's.
os.environ.setdefault("MEGATIER_CACHE_DIR", str(Path(tempfile.gettempdir()) / "megatier-test-cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512)

# (transformers class name, config overrides): every architecture and shape family we support.
ARCH_CASES = {
    "llama-llama3rope-tied-bias": (
        "Llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-mqa-untied": ("Llama", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen2": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3-headdim24": ("Qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
}


def make_hf_model(tmp_path: Path, case: str, seed: int = 0):
    """Save a tiny random transformers model of `case` to tmp_path; return (path, the HF model in fp32)."""
    import transformers

    family, overrides = ARCH_CASES[case]
    cfg = getattr(transformers, f"{family}Config")(**TINY, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.fixture(params=sorted(ARCH_CASES))
def hf_model(request, tmp_path):
    """Each supported architecture as (directory, transformers model)."""
    return make_hf_model(tmp_path, request.param)


def gpt2_byte_chars() -> list[str]:
    """The printable character byte-level BPE uses for each byte value (the GPT-2 convention)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer (ids 0-255 are bytes; 256 <s>, 257 </s>) with a simple chat template, so a
    tiny random model (vocab 300) takes text prompts, chats and hits stop strings in tests."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(gpt2_byte_chars())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
