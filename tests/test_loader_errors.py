"""Every bad checkpoint gets a one-line MegatierError naming the file or field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model
from megatier import LLM, MegatierError
from megatier.config import load_config
from megatier.loader import load_safetensors_weights


@pytest.fixture
def model_dir(tmp_path):
    path, _ = make_hf_model(tmp_path / "m", "llama-mqa-untied")
    return path


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def load(path):
    cfg = load_config(path)
    return load_safetensors_weights(path, cfg)


def expect_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(MegatierError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_model_path(tmp_path):
    expect_error("no such file or directory", LLM, str(tmp_path / "nope"))


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    expect_error(r"config\.json: file not found", load_config, model_dir)


def test_missing_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    expect_error("no model.safetensors", load, model_dir)


def test_missing_shard(model_dir):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(r"model-00001-of-00002\.safetensors: file not found", load, model_dir)


def test_sharded_checkpoint_loads(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, model_dir / file)
    (model_dir / "model.safetensors").unlink()
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = load(model_dir)
    torch.testing.assert_close(weights.embed, tensors["model.embed_tokens.weight"])


def test_unsupported_architecture(model_dir):
    edit_config(model_dir, architectures=["GPT2LMHeadModel"])
    expect_error("unsupported architecture GPT2LMHeadModel", load_config, model_dir)


def test_unsupported_rope_type(model_dir):
    edit_config(model_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    expect_error("unsupported rope type 'yarn'", load_config, model_dir)


def test_missing_config_field(model_dir):
    edit_config(model_dir, hidden_size=None)
    expect_error("missing field 'hidden_size'", load_config, model_dir)


def test_unknown_config_dtype(model_dir):
    edit_config(model_dir, dtype="float8_e4m3")
    expect_error("unknown .*dtype 'float8_e4m3'", load_config, model_dir)


def test_unknown_requested_dtype(model_dir):
    expect_error("unknown dtype 'int8'", LLM, str(model_dir), dtype="int8")


def test_invalid_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    expect_error("not valid JSON", load_config, model_dir)


def test_shape_mismatch(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.randn(95, 64)
    save_file(tensors, model_dir / "model.safetensors")
    message = expect_error(r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(95, 64\)", load, model_dir)
    assert "model.safetensors" in message


def test_dtype_mismatch(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, model_dir / "model.safetensors")
    expect_error(r"'model\.norm\.weight' has unsupported dtype torch\.int32", load, model_dir)


def test_missing_tensor(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    expect_error(r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' missing", load, model_dir)


def test_truncated_safetensors(model_dir):
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error("truncated or corrupt safetensors", load, model_dir)


def test_corrupt_safetensors(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    expect_error("truncated or corrupt safetensors", load, model_dir)


def test_builtin_shape_needs_dummy():
    expect_error("built-in shape without weights", LLM, "qwen2.5-0.5b")


def test_text_prompt_without_tokenizer(model_dir):
    llm = LLM(str(model_dir), kv_cache_gb=0.01)
    expect_error("no tokenizer.json", llm.generate, "hello")


def test_bad_tokenizer_file(model_dir, tmp_path):
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    (model_dir / "tokenizer.json").write_text("{}")
    expect_error("cannot parse tokenizer", LLM, str(model_dir), kv_cache_gb=0.01)
