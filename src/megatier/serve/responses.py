"""OpenAI response bodies and stream chunks, built from engine updates.

A choice's index is prompt_index * n + sequence index, as OpenAI numbers the choices of a batch of
prompts. Every step that yields tokens gets a chunk, even when its text is still held back (an
incomplete UTF-8 character, a possible stop string), so clients can time each token. CompletionFormat
and ChatFormat share one interface (the update as shown, opening chunks, one chunk per update, the whole
response), so the streaming and collecting code in app.py serves both endpoints.

With echo, a completion choice's text (streamed: its first chunk) starts with its prompt's text, and its
logprobs cover the prompt's tokens (None for the first, which nothing predicts), then the generated ones.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from megatier.engine import SequenceUpdate
from megatier.sampling import PromptLogprobs
from megatier.serve.tools import ToolCall, ToolCallStream, ToolUse
from megatier.tokenizer import Tokenizer


@dataclass
class Choice:
    """One choice's output, accumulated from its updates (non-streaming responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None

    def add(self, update: SequenceUpdate) -> None:
        self.text += update.delta_text
        self.token_ids.extend(update.new_token_ids)
        self.logprobs.extend(update.new_logprobs)
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = update.prompt_logprobs
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
    """What both endpoints share: ids, envelopes, usage and token names for logprobs."""

    id_prefix = ""
    # The "object" field of whole responses and of stream chunks.
    response_object = ""
    chunk_object = ""

    def __init__(
        self,
        model: str,
        n: int,
        top_n: int | None,
        tokenizer: Tokenizer | None,
        prompts: list[list[int]],
        include_usage: bool = False,
        continuous_usage: bool = False,
    ):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.top_n = top_n  # None: no logprobs
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage  # every chunk carries its choice's usage so far
        self._completion_tokens: dict[int, int] = defaultdict(int)  # per choice, streamed so far

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def take(self, update: SequenceUpdate) -> SequenceUpdate:
        """The update as this response shows it (and counts it in usage)."""
        return update

    def _envelope(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        } | extra

    def chunk_envelope(self, index: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A chunk of choice `index`."""
        if self.continuous_usage:
            extra = {"usage": usage(len(self.prompts[index // self.n]), self._completion_tokens[index])}
        else:
            extra = {"usage": None} if self.include_usage else {}
        return self._envelope(self.chunk_object, choices, **extra)

    def _count(self, index: int, update: SequenceUpdate) -> None:
        self._completion_tokens[index] += len(update.new_token_ids)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [], usage=usage(prompt_tokens, completion_tokens))

    def opening(self) -> list[dict[str, Any]]:
        return []


class CompletionFormat(_Format):
    id_prefix = "cmpl"
    response_object = chunk_object = "text_completion"

    def __init__(
        self,
        *args: Any,
        echo: list[str] | None = None,
        prompt_only: bool = False,
        prompt_top_n: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.echo = echo  # each prompt's text, which its choices start with (echo=true)
        self.prompt_only = prompt_only  # echo with max_tokens=0: generated tokens are not shown
        self.prompt_top_n = prompt_top_n  # vLLM's prompt_logprobs field; None: not asked for
        self._text_offset: dict[int, int] = defaultdict(int)  # per choice, for streamed logprobs
        self._opened: set[int] = set()  # choices whose first chunk (or whole body) was built

    def take(self, update: SequenceUpdate) -> SequenceUpdate:
        if not self.prompt_only:
            return update
        reason = update.finish_reason if update.finish_reason == "abort" else "length"
        return replace(update, new_token_ids=[], delta_text="", new_logprobs=[], finish_reason=reason, stop_reason=None)

    def logprobs(self, index: int, token_ids: list[int], logprobs: list[dict[int, float] | None]) -> dict | None:
        """The legacy completions format; None entries are prompt positions nothing scores."""
        if self.top_n is None:
            return None
        tokens = [self.token_str(t) for t in token_ids]
        offsets = []
        for s in tokens:
            offsets.append(self._text_offset[index])
            self._text_offset[index] += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [None if lp is None else lp[t] for t, lp in zip(token_ids, logprobs, strict=True)],
            "top_logprobs": [
                None if lp is None else {self.token_str(t): v for t, v in _top(lp, self.top_n)} for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def _prompt_logprobs(self, prompt: list[int], scored: PromptLogprobs | None) -> list[dict | None] | None:
        """vLLM's prompt_logprobs: per prompt position {token id: {logprob, rank, decoded_token}}, the
        prompt token first, then the top-N."""
        if scored is None:
            return None
        out: list[dict | None] = [None]
        for token, lp, rank in zip(prompt[1:], scored.logprobs[1:], scored.ranks[1:], strict=True):
            entries = {token: (lp[token], rank)}
            for r, (t, v) in enumerate(_top(lp, self.prompt_top_n), 1):
                entries.setdefault(t, (v, r))
            out.append(
                {str(t): {"logprob": v, "rank": r, "decoded_token": self.token_str(t)} for t, (v, r) in entries.items()}
            )
        return out

    def _choice(
        self,
        index: int,
        text: str,
        token_ids: list[int],
        logprobs: list[dict[int, float]],
        scored: PromptLogprobs | None,
        finish_reason: str | None,
        stop_reason: str | int | None,
    ) -> dict[str, Any]:
        """One choice's body, whole or a chunk; the first of a choice starts with its echoed prompt."""
        first = index not in self._opened
        self._opened.add(index)
        prompt = self.prompts[index // self.n]
        all_logprobs: list[dict[int, float] | None] = list(logprobs)
        if first and self.echo is not None:
            text = self.echo[index // self.n] + text
            token_ids = prompt + token_ids
            # A request cancelled before its prompt was scored has no prompt logprobs.
            all_logprobs = (scored.logprobs if scored is not None else [None] * len(prompt)) + all_logprobs
        body = {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(index, token_ids, all_logprobs),
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        if first and self.prompt_top_n is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(prompt, scored)
        return body

    def chunk(self, index: int, update: SequenceUpdate) -> dict[str, Any] | None:
        self._count(index, update)
        if not (update.new_token_ids or update.finished):
            return None
        finish_reason = update.finish_reason if update.finished else None
        choice = self._choice(
            index,
            update.delta_text,
            update.new_token_ids,
            update.new_logprobs,
            update.prompt_logprobs,
            finish_reason,
            update.stop_reason,
        )
        return self.chunk_envelope(index, [choice])

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        body = [
            self._choice(i, c.text, c.token_ids, c.logprobs, c.prompt_logprobs, c.finish_reason, c.stop_reason)
            for i, c in enumerate(choices)
        ]
        return self._envelope(
            self.response_object, body, usage=usage(prompt_tokens, sum(len(c.token_ids) for c in choices))
        )


class ChatFormat(_Format):
    """With tools that the model may call, each choice's text goes through a ToolCallStream: content
    streams as it comes (but for text that may still be a call), and each call as tool_calls deltas, its
    name first, then its arguments as they grow. Text that turns out to be a call is never streamed as
    content, and the deltas add up to the message a whole response gives."""

    id_prefix = "chatcmpl"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args: Any, tool_use: ToolUse | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.tool_use = tool_use
        self._streams: dict[int, ToolCallStream] = {}  # per choice, with tool_use

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message for an output (its tool calls parsed), and its finish reason."""
        if self.tool_use is None:
            return {"content": text}, finish_reason
        content, calls = self.tool_use.parse(text)
        if not calls:
            return {"content": text}, finish_reason
        return {"content": content, "tool_calls": [c.as_dict() for c in calls]}, _finish_reason(calls, finish_reason)

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
                i,
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
            )
            for i in range(self.n)
        ]

    def chunk(self, index: int, update: SequenceUpdate) -> dict[str, Any] | None:
        self._count(index, update)
        if not (update.new_token_ids or update.finished):
            return None
        if self.tool_use is None:
            delta = {"content": update.delta_text} if update.new_token_ids else {}
            finish_reason = update.finish_reason
        else:
            delta, finish_reason = self._tool_delta(index, update)
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self.logprobs(update.new_token_ids, update.new_logprobs),
            "finish_reason": finish_reason if update.finished else None,
            "stop_reason": update.stop_reason,
        }
        return self.chunk_envelope(index, [choice])

    def _tool_delta(self, index: int, update: SequenceUpdate) -> tuple[dict[str, Any], str | None]:
        """A choice's delta with tools (content and tool_calls, either maybe empty), and its finish reason."""
        if index not in self._streams:
            self._streams[index] = ToolCallStream(self.tool_use)
        stream = self._streams[index]
        content, calls = (stream.finish if update.finished else stream.feed)(update.delta_text)
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = [c.as_dict() for c in calls]
        return delta, _finish_reason(stream.calls, update.finish_reason)

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        body = []
        for i, c in enumerate(choices):
            message, finish_reason = self.message(c.text, c.finish_reason)
            body.append(
                {
                    "index": i,
                    "message": {"role": "assistant"} | message,
                    "logprobs": self.logprobs(c.token_ids, c.logprobs),
                    "finish_reason": finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        return self._envelope(
            self.response_object, body, usage=usage(prompt_tokens, sum(len(c.token_ids) for c in choices))
        )


def _finish_reason(calls: list[ToolCall], finish_reason: str | None) -> str | None:
    """A choice that made calls and stopped of itself finished with "tool_calls", as OpenAI says it."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason
