"""Tokenizer (Hugging Face `tokenizers`) plus the model's chat template, rendered in a jinja2 sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from megatier.errors import MegatierError

Message = dict[str, Any]


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens either as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, model_dir: Path):
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise MegatierError(f"{path}: file not found (text prompts need tokenizer.json; pass token ids instead)")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise MegatierError(f"{path}: cannot parse tokenizer ({str(e).splitlines()[0]})") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = _read_chat_template(model_dir, config)
        self.eos_token_id = self.hf.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        """A streaming decoder: `.step(self.hf, token_id)` returns the new text, or None while a
        multi-byte character is still incomplete."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if self.chat_template is None:
            raise MegatierError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise MegatierError(f"messages[{i}]: each message needs a 'role' and a 'content'")
        try:
            return _compile(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise MegatierError(f"chat template failed: {e}") from None

    def encode_chat(
        self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        # The template writes BOS itself when the model wants one, as transformers assumes.
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        return self.encode(text, add_special_tokens=False)


_TEMPLATES: dict[str, Any] = {}


def _compile(source: str) -> Any:
    if source not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegatierError(f"{path}: not valid JSON ({e})") from None


def _read_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template") or _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
