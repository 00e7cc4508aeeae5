"""OpenAI response bodies and stream chunks, built from engine updates.

A choice's index is prompt_index * n + sequence index, as OpenAI numbers the choices of a batch of
prompts. Every step that yields tokens gets a chunk, even when its text is still held back (an
incomplete UTF-8 character, a possible stop string), so clients can time each token. CompletionFormat and ChatFormat share one interface (opening chunks, one chunk per update, the
whole response), so the streaming and collecting code in app.py serves both endpoints.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from megatier.engine import SequenceUpdate
from megatier.tokenizer import Tokenizer


@dataclass
class Choice:
    """One choice's output, accumulated from its updates (non-streaming responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, update: SequenceUpdate) -> None:
        self.text += update.delta_text
        self.token_ids.extend(update.new_token_ids)
        self.logprobs.extend(update.new_logprobs)
        if update.finished:
            self.finish_reason, self.stop_reason = update.finish_reason, update.stop_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _top(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]


class _Format:
    """What both endpoints share: ids, envelopes and token names for logprobs."""

    id_prefix = ""
    # The "object" field of whole responses and of stream chunks.
    response_object = ""
    chunk_object = ""

    def __init__(self, model: str, n: int, top_n: int | None, tokenizer: Tokenizer | None, include_usage: bool):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.top_n = top_n  # None: no logprobs
        self.tokenizer = tokenizer
        self.include_usage = include_usage

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _envelope(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        } | extra

    def chunk_envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return self._envelope(self.chunk_object, choices, **({"usage": None} if self.include_usage else {}))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [], usage=usage(prompt_tokens, completion_tokens))

    def opening(self) -> list[dict[str, Any]]:
        return []


class CompletionFormat(_Format):
    id_prefix = "cmpl"
    response_object = chunk_object = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._text_offset: dict[int, int] = defaultdict(int)  # per choice, for streamed logprobs

    def logprobs(self, index: int, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict | None:
        if self.top_n is None:
            return None
        tokens = [self.token_str(t) for t in token_ids]
        offsets = []
        for s in tokens:
            offsets.append(self._text_offset[index])
            self._text_offset[index] += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [lp[t] for t, lp in zip(token_ids, logprobs, strict=True)],
            "top_logprobs": [{self.token_str(t): v for t, v in _top(lp, self.top_n)} for lp in logprobs],
            "text_offset": offsets,
        }

    def chunk(self, index: int, update: SequenceUpdate) -> dict[str, Any] | None:
        if not (update.new_token_ids or update.finished):
            return None
        choice = {
            "index": index,
            "text": update.delta_text,
            "logprobs": self.logprobs(index, update.new_token_ids, update.new_logprobs),
            "finish_reason": update.finish_reason if update.finished else None,
            "stop_reason": update.stop_reason,
        }
        return self.chunk_envelope([choice])

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        body = [
            {
                "index": i,
                "text": c.text,
                "logprobs": self.logprobs(i, c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for i, c in enumerate(choices)
        ]
        return self._envelope(
            self.response_object, body, usage=usage(prompt_tokens, sum(len(c.token_ids) for c in choices))
        )


class ChatFormat(_Format):
    id_prefix = "chatcmpl"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        s = self.token_str(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    def logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict | None:
        if self.top_n is None:
            return None
        return {
            "content": [
                self._entry(t, lp[t]) | {"top_logprobs": [self._entry(a, v) for a, v in _top(lp, self.top_n)]}
                for t, lp in zip(token_ids, logprobs, strict=True)
            ]
        }

    def opening(self) -> list[dict[str, Any]]:
        """The role comes first, in a chunk of its own for every choice, as OpenAI streams it."""
        return [
            self.chunk_envelope(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(self.n)
        ]

    def chunk(self, index: int, update: SequenceUpdate) -> dict[str, Any] | None:
        if not (update.new_token_ids or update.finished):
            return None
        choice = {
            "index": index,
            "delta": {"content": update.delta_text} if update.new_token_ids else {},
            "logprobs": self.logprobs(update.new_token_ids, update.new_logprobs),
            "finish_reason": update.finish_reason if update.finished else None,
            "stop_reason": update.stop_reason,
        }
        return self.chunk_envelope([choice])

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        body = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self.logprobs(c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for i, c in enumerate(choices)
        ]
        return self._envelope(
            self.response_object, body, usage=usage(prompt_tokens, sum(len(c.token_ids) for c in choices))
        )
