"""Request bodies of the OpenAI-compatible API, and their translation into token ids and SamplingParams.

Fields follow the OpenAI API plus the extras that vLLM and SGLang accept and their benchmark tools send
(top_k, min_p, ignore_eos, min_tokens, prompt_logprobs, guided_json, ...). Unknown fields are ignored, as
the peers do; known fields asking for what this server cannot do (legacy functions, suffix, best_of) are refused
with a 400 naming the field rather than silently ignored. pydantic checks types; SamplingParams
checks values, so each rule lives in one place.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from megatier.errors import MegatierError
from megatier.sampling import SamplingParams
from megatier.serve.tools import ToolUse, template_tool_calls
from megatier.structured import StructuredOutput
from megatier.tokenizer import Message, Tokenizer


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the request's usage
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's usage so far


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    json_schema: JsonSchemaFormat | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, kind: str) -> str:
        if kind not in ("text", "json_object", "json_schema"):
            raise _unsupported(f"{kind!r} is not a response_format type: use text, json_object or json_schema")
        return kind

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise MegatierError("response_format json_schema needs json_schema.schema")
            return StructuredOutput(json_schema=self.json_schema.schema_)
        return None


def _unsupported(message: str) -> PydanticCustomError:
    """A 400 whose message is `message` alone (a ValueError would get pydantic's "Value error, " prefix)."""
    return PydanticCustomError("unsupported", message)


class GenerationRequest(BaseModel):
    """What /v1/completions and /v1/chat/completions share. None means "the model's default"."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # JSON keys are token id strings
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extras; at most one of them, or response_format, per request.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def structured_field(self) -> str | None:
        """The request field that asks for structured output, for error messages."""
        guided = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
        named = next((f for f in guided if getattr(self, f) is not None), None)
        if named is None and self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        return named

    def structured_output(self) -> StructuredOutput | None:
        """The one constraint that response_format or a guided_* field asks for (MegatierError for two)."""
        guided = {
            "guided_json": self.guided_json is not None and StructuredOutput(json_schema=self.guided_json),
            "guided_regex": self.guided_regex is not None and StructuredOutput(regex=self.guided_regex),
            "guided_choice": self.guided_choice is not None and StructuredOutput(choice=self.guided_choice),
            "guided_grammar": self.guided_grammar is not None and StructuredOutput(grammar=self.guided_grammar),
            "response_format": self.response_format is not None and self.response_format.structured_output(),
        }
        asked = {k: v for k, v in guided.items() if v}
        if len(asked) > 1:
            raise MegatierError(f"send one structured output field, not {' and '.join(asked)}")
        return next(iter(asked.values()), None)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def sampling_params(
        self, defaults: SamplingParams, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """The request's settings over `defaults` (the model's generation_config.json); raises MegatierError
        for values out of range."""
        given = {
            "n": self.n,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "logit_bias": self.logit_bias,
            "structured_output": self.structured_output(),
        }
        keep_none = {"max_tokens", "seed", "logprobs", "prompt_logprobs"}  # None is a meaningful value for these
        return dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None or k in keep_none})


class CompletionRequest(GenerationRequest):
    # One prompt or a batch of them, each as text or as token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # 0 with echo: only score the prompt (lm-eval's loglikelihood requests)
    logprobs: int | None = None
    echo: bool = False  # the prompt's text (and, with logprobs, its tokens' logprobs) before each choice's
    prompt_logprobs: int | None = None  # vLLM's: each choice gets "prompt_logprobs", top-N per prompt token
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, prompt: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # One sentence instead of pydantic's error per member of the union.
        try:
            return handler(prompt)
        except ValidationError:
            raise PydanticCustomError(
                "prompt_type", "expected a string, a list of strings, a list of token ids or a list of token id lists"
            ) from None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise _unsupported("is not supported (no insertion on this server)")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise _unsupported("only best_of=1 is supported: use n for several choices")
        return best_of

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens=0: the engine generates one token (it needs the prompt's last logits for
        nothing else), and the response drops it."""
        return self.echo and self.max_tokens == 0

    def engine_prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs: enough alternatives for both the echoed logprobs and vLLM's field."""
        wanted = [n for n in (self.prompt_logprobs, self.logprobs if self.echo else None) if n is not None]
        return max(wanted) if wanted else None

    def prompt_ids(self, tokenizer: Tokenizer | None) -> list[list[int]]:
        prompts = [self.prompt] if isinstance(self.prompt, str) or _is_ids(self.prompt) else self.prompt
        if not prompts:
            raise MegatierError("the prompt is empty")
        return [encode(p, tokenizer) if isinstance(p, str) else list(p) for p in prompts]

    def echo_texts(self, prompts: list[list[int]], tokenizer: Tokenizer | None) -> list[str]:
        """Each prompt's text as echo returns it: as sent, or decoded from its token ids."""
        sent = [self.prompt] if isinstance(self.prompt, str) or _is_ids(self.prompt) else self.prompt
        if tokenizer is None:  # only token id prompts get this far without one
            raise MegatierError("echo=true needs the model's tokenizer to return the prompt's text")
        return [
            p if isinstance(p, str) else tokenizer.decode(ids, self.skip_special_tokens)
            for p, ids in zip(sent, prompts, strict=True)
        ]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_calls, ...) pass through to the chat template.
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool = True
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None

    @field_validator("function_call")
    @classmethod
    def _no_forced_function(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if choice not in (None, "none", "auto"):
            raise _unsupported("the legacy function_call is not supported: use tools and tool_choice")
        return choice

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, functions: list[dict[str, Any]] | None, info: ValidationInfo) -> list[dict[str, Any]] | None:
        if functions and info.data.get("function_call") != "none":
            raise _unsupported("the legacy functions are not supported: send them as tools")
        return functions

    @cached_property
    def tool_use(self) -> ToolUse | None:
        """The tools the model may call and how (MegatierError naming what is malformed)."""
        return ToolUse.from_request(self.tools, self.tool_choice, self.parallel_tool_calls)

    def structured_field(self) -> str | None:
        use = self.tool_use
        return "tool_choice" if use is not None and use.constraint() is not None else super().structured_field()

    def structured_output(self) -> StructuredOutput | None:
        """A forced tool call's constraint, or what response_format or a guided_* field asks for."""
        use, asked = self.tool_use, super().structured_output()
        forced = use.constraint() if use is not None else None
        if forced is not None and asked is not None:
            raise MegatierError("a forced tool_choice cannot be combined with response_format or guided_* fields")
        return forced or asked

    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: how many alternatives per token, None for no logprobs at all."""
        if self.top_logprobs is not None and not self.logprobs:
            raise MegatierError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_ids(self, tokenizer: Tokenizer | None) -> list[int]:
        if tokenizer is None:
            raise MegatierError(
                "this model has no tokenizer, so chat is unavailable: use /v1/completions with token ids"
            )
        use = self.tool_use
        return tokenizer.encode_chat(template_messages(self.messages), tools=use.tools if use is not None else None)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def _is_ids(prompt: list[Any]) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def encode(text: str, tokenizer: Tokenizer | None) -> list[int]:
    if tokenizer is None:
        raise MegatierError("this model has no tokenizer: send the prompt as a list of token ids")
    return tokenizer.encode(text)


def template_messages(messages: list[ChatMessage]) -> list[Message]:
    """Messages as the chat template expects them, with content parts joined into one string."""
    out = []
    for i, m in enumerate(messages):
        message = template_tool_calls(m.model_dump(exclude_none=True))
        if isinstance(m.content, list):
            kinds = {p.type for p in m.content} - {"text"}
            if kinds:
                raise MegatierError(f"messages.{i}.content: only text parts are supported, not {sorted(kinds)}")
            message["content"] = "".join(p.text or "" for p in m.content)
        out.append(message)
    return out
