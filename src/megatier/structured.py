"""Structured output: a JSON schema, any JSON object, a regex, a choice of strings or a Lark grammar
constrains what a request generates.

llguidance compiles the grammar against the tokenizer and, before each draw, gives the tokens that keep
the output a prefix of a string the grammar accepts, as a bitmask; the sampler sends every other token
to -inf on the device. A sequence's next mask needs its last token, so the engine takes a step that
sampled a constrained sequence before it schedules the next one (that step gives up the overlap).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import llguidance
import llguidance.numpy
import torch

from megatier.errors import MegatierError
from megatier.tokenizer import Tokenizer

# A schema's own "x-guidance" options override these (llguidance applies defaults, then the schema's).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one constraint. `json_schema` is a schema (dict or JSON text); `json_object` asks for any
    JSON object; `regex` must match the whole output; `choice` is a list of allowed outputs; `grammar` is
    a Lark grammar (llguidance's dialect)."""

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [self.json_schema is not None, self.json_object, self.regex is not None]
        given += [self.choice is not None, self.grammar is not None]
        if sum(given) != 1:
            raise MegatierError(
                "structured output takes exactly one of json_schema, json_object, regex, choice, grammar"
            )
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise MegatierError("structured output choice must be a non-empty list of non-empty strings")

    def llguidance_grammar(self) -> str:
        """The constraint in llguidance's grammar format. JSON comes in json.dumps's layout (", " and ": ",
        no other whitespace): a grammar that allows any whitespace lets a model pad forever."""
        if self.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_LAYOUT)
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise MegatierError(f"invalid JSON schema: not JSON ({e})") from None
            return llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_LAYOUT)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        return llguidance.LLMatcher.grammar_from_lark(self.grammar)


class Grammars:
    """The model's tokenizer compiled for llguidance (once, on first use: about half a second for a 50K
    vocabulary), and a matcher per constrained sequence. The mask covers the model's vocabulary, which
    may be larger than the tokenizer's: tokens the tokenizer lacks are never allowed."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, list(eos_token_ids)

    @cached_property
    def _lltokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.LLTokenizer(self._tokenizer.hf.to_str(), n_vocab=self.vocab_size, eos_token=self._eos)

    def matcher(self, constraint: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the constrained output (the grammar compiled for the tokenizer);
        raises MegatierError (one line) if the grammar does not compile."""
        try:
            grammar = constraint.llguidance_grammar()
        except (ValueError, TypeError) as e:
            raise MegatierError(f"invalid structured output: {_one_line(e)}") from None
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise MegatierError(f"invalid structured output: {_one_line(matcher.get_error())}")
        return matcher


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def token_masks(matchers: list[llguidance.LLMatcher | None], vocab_size: int) -> torch.Tensor:
    """int32 [len(matchers), ceil(vocab / 32)] on the host: bit t % 32 of word t // 32 is set when token t
    may come next; a row without a matcher allows every token. (llguidance's numpy helpers: its torch
    module imports torch.compile's machinery, seconds at every start.)"""
    masks = llguidance.numpy.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            llguidance.numpy.fill_next_token_bitmask(matcher, masks, row)
    return torch.from_numpy(masks)


def apply_token_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` [rows, vocab] with the tokens `masks` (on the logits' device) forbids at -inf.
    (llguidance's own apply_token_bitmask_inplace wraps this in torch.compile, which would compile on
    the first constrained request; these few element-wise ops need no compilation.)"""
    bits = torch.arange(32, dtype=torch.int32, device=masks.device)
    allowed = ((masks[:, :, None] >> bits) & 1).flatten(1)[:, : logits.shape[1]].bool()
    return logits.masked_fill(~allowed, float("-inf"))
