"""Tool calls on /v1/chat/completions.

The tools go to the model's chat template (its `tools` variable). With tool_choice "required" or a named
function the output is constrained by structured output to a call: for a named function, its arguments
(an object of the function's parameter schema); for "required", a JSON list of {"name", "arguments"}
objects, each for one of the tools. With "auto" (the default when tools are sent) the model chooses,
and its text is parsed for calls written the two ways chat templates teach: `<tool_call>{...}</tool_call>`
blocks (Hermes, Qwen 2.5/3, SmolLM3) and a reply that is one JSON object {"name", "arguments" or
"parameters"} (Llama 3.x). Calls to a name that is not among the tools are left as text.

ToolCallStream parses a choice's text as it is generated, so that a stream sends content as it comes and
each call as soon as its name is known, then its arguments as they grow; ToolUse.parse is that stream fed
the whole text at once, so a streamed response and a whole one always agree.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatier.errors import MegatierError
from megatier.structured import StructuredOutput

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_JSON_SPACE = " \t\n\r"


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it

    def as_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": _call_id(), "type": "function", "function": function}


@dataclass
class ToolCallDelta:
    """A streamed piece of call `index`: the first of a call names its function; the others add to its
    arguments' text."""

    index: int
    name: str | None = None
    arguments: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The delta's tool_calls entry, as OpenAI streams it: id and type come with the name only."""
        if self.name is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": _call_id(), "type": "function", "function": function}


@dataclass
class ToolUse:
    """A request's tools and how the model may use them."""

    tools: list[dict[str, Any]]  # OpenAI's {"type": "function", "function": {...}}, checked
    choice: str  # "auto" | "required" | a function's name
    parallel: bool = True  # OpenAI's parallel_tool_calls: False allows one call at most

    @classmethod
    def from_request(
        cls, tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None, parallel: bool = True
    ) -> ToolUse | None:
        """None when no tool may be called (no tools, or tool_choice "none"); MegatierError naming what
        is malformed otherwise."""
        if choice == "none" or (not tools and choice in (None, "auto")):
            return None
        if not tools:
            raise MegatierError(f"tool_choice {json.dumps(choice)} needs tools")
        names = [_function(t, i)["name"] for i, t in enumerate(tools)]
        if len(set(names)) != len(names):
            raise MegatierError("tools: function names must be unique")
        if choice in (None, "auto", "required"):
            return cls(tools, choice or "auto", parallel)
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str):
            raise MegatierError(
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            )
        if name not in names:
            raise MegatierError(f"tool_choice names {name!r}, which is not among the tools")
        return cls(tools, name, parallel)

    @property
    def functions(self) -> dict[str, dict[str, Any]]:
        return {f["name"]: f for f in (t["function"] for t in self.tools)}

    def constraint(self) -> StructuredOutput | None:
        """What the output must be: the named function's arguments, a list of calls, or free ("auto")."""
        if self.choice == "auto":
            return None
        if self.choice != "required":
            return StructuredOutput(json_schema=_parameters(self.functions[self.choice]))
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": _parameters(f)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, f in self.functions.items()
        ]
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1} | (
            {} if self.parallel else {"maxItems": 1}
        )
        return StructuredOutput(json_schema=schema)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(the content left, the calls) of a finished output: what a ToolCallStream fed it makes of it.
        Without calls the content is the text as it is."""
        stream = ToolCallStream(self)
        stream.finish(text)
        return (stream.content or None) if stream.calls else text, stream.calls


def _function(tool: dict[str, Any], i: int) -> dict[str, Any]:
    function = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise MegatierError(
            f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}'
        )
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise MegatierError(f"tools[{i}].function needs a name")
    if not isinstance(function.get("parameters", {}), dict):
        raise MegatierError(f"tools[{i}].function.parameters must be a JSON schema object")
    return function


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object"}


def _decode(string: str) -> str:
    """A JSON string token's value (its text between the quotes if it has a bad escape)."""
    try:
        return json.loads(string, strict=False)
    except json.JSONDecodeError:
        return string[1:-1]


def _compact(text: str) -> str:
    """JSON text as json.dumps writes it, as _Value spaces it (text that is not JSON as it is)."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return text


def _tag_start(text: str, *tags: str) -> int:
    """Where the longest end of text that could begin one of the tags starts (len(text): no end can)."""
    for i in range(len(text)):
        if any(tag.startswith(text[i:]) for tag in tags):
            return i
    return len(text)


class _Value:
    """One JSON value, fed a character at a time from its first. Strings (and their escapes) and the
    nesting of objects and arrays say where it ends; a number or literal ends at the first character that
    cannot be part of it, which is left to the caller. Its text is kept spaced as json.dumps writes JSON
    (no whitespace between tokens but one space after each ':' and ','), which a stream can send as it
    grows; the JSON is not otherwise checked."""

    def __init__(self) -> None:
        self.text = ""
        self.done = False
        self._depth = 0  # objects and arrays open
        self._in_string = False
        self._escaped = False  # the last character was a backslash in a string

    @property
    def is_string(self) -> bool:
        return self.text.startswith('"')

    def feed(self, ch: str) -> bool:
        """Whether ch belongs to the value (False: it ended before ch, or ch cannot begin a value)."""
        if self.done:
            return False
        if self._in_string:
            self._string_char(ch)
        elif not self.text:
            return self._first(ch)
        elif self._depth == 0:  # a number or literal
            if not _scalar_char(ch):
                self.done = True
                return False
            self.text += ch
        elif ch not in _JSON_SPACE:
            self._structure_char(ch)
        return True

    def _first(self, ch: str) -> bool:
        if ch in _JSON_SPACE:
            return True
        if not (ch in '"{[' or _scalar_char(ch)):
            return False
        self.text = ch
        self._in_string = ch == '"'
        self._depth = int(ch in "{[")
        return True

    def _string_char(self, ch: str) -> None:
        self.text += ch
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False
            self.done = self._depth == 0

    def _structure_char(self, ch: str) -> None:
        self.text += (ch + " ") if ch in ":," else ch
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            self.done = self._depth == 0


def _scalar_char(ch: str) -> bool:
    """Whether ch can be part of a JSON number or literal (true, false, null)."""
    return (ch.isascii() and ch.isalnum()) or ch in "+-."


class _CallObject:
    """A call written as a JSON object {"name": ..., "arguments": ...}, fed a character at a time from its
    "{". Its name is known as soon as that string closes, whichever key comes first, and its arguments'
    text grows as it is fed, so that both can be streamed. "parameters" stands for "arguments", as Llama 3
    writes it; other keys are skipped, and so is a second "name" or "arguments"."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.done = False  # its closing brace came
        self._state = "open"  # what comes next: open ("{"), key, colon, value or next ("," or "}")
        self._key = ""  # the key whose value comes next
        self._token: _Value | None = None  # the key or value being read
        self._arguments: _Value | None = None

    @property
    def arguments(self) -> str:
        """The arguments' text so far. Arguments written as a string of JSON text come whole once that
        string closes: they are decoded then."""
        value = self._arguments
        if value is None:
            return ""
        if not value.is_string:
            return value.text
        return _compact(_decode(value.text)) if value.done else ""

    def feed(self, ch: str) -> bool:
        """Whether ch continues the object (False: it ended before ch, or is malformed at ch)."""
        if self._token is not None:
            if self._token.feed(ch):
                if self._token.done:
                    self._end_token()
                return True
            if not self._token.done:
                return False
            self._end_token()  # a number or literal, ended by ch
        if self.done:
            return False
        if ch in _JSON_SPACE:
            return True
        if self._state == "value":
            return self._begin_value(ch)
        if self._state == "key" and ch == '"':
            self._token = _Value()
            return self._token.feed(ch)
        if self._state in ("key", "next") and ch == "}":
            self.done = True
            return True
        step = {("open", "{"): "key", ("colon", ":"): "value", ("next", ","): "key"}.get((self._state, ch))
        if step is None:
            return False
        self._state = step
        return True

    def _begin_value(self, ch: str) -> bool:
        if self._key == "name" and self.name is None and ch != '"':
            return False  # a name that is not a string: not a call
        self._token = _Value()
        if self._key in ("arguments", "parameters") and self._arguments is None:
            self._arguments = self._token
        return self._token.feed(ch)

    def _end_token(self) -> None:
        token, self._token = self._token, None
        if self._state == "key":
            self._key, self._state = _decode(token.text), "colon"
            return
        if self._key == "name" and self.name is None:
            self.name = _decode(token.text)
        self._state = "next"


class ToolCallStream:
    """One choice's text, fed as it is generated, split into content and tool-call deltas.

    Content is sent as it comes, but for text that may still be (part of) a call: with "auto", an end
    that could begin "<tool_call>", and a block from its "<tool_call>" until its call's name is known;
    a reply whose text starts with "{" until its name is known (Llama 3 writes a call as the whole
    reply); with "required", everything until the first call's name. Whitespace is held until text
    follows it, so that a reply with calls can drop it at its start and end (parse's content is stripped).

    A call is sent as soon as its name is known and is one of the tools: a first delta with its name, then
    its arguments' text as it grows (a named tool_choice's call is sent at once: the output is its
    arguments). Text that turns out not to be a call (an unknown name, no name, not JSON) is content, as
    it was written, and what follows it is parsed as text. parallel_tool_calls=False drops the calls after
    the first, blocks and all.

    What was sent stands, as a stream cannot take it back: a call that is cut off (max_tokens) or turns
    out malformed after its name stays a call with the arguments as far as they came ("{}" where none
    did), and what is left of its block, up to "</tool_call>", is dropped. The arguments are the model's
    JSON respaced as json.dumps writes it (whole JSON of the arguments once the call is complete), not
    otherwise checked.
    """

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.text = ""  # all of it so far
        self.content = ""  # sent so far
        self.calls: list[ToolCall] = []  # sent so far, the last one's arguments maybe still growing
        self._held = ""  # what may still be part of a call, or a tag of one
        self._space = ""  # whitespace at the end of the content, held until text follows it
        self._started = False  # text other than whitespace came
        self._call: _CallObject | None = None
        self._kind = ""  # how the call being read is written: "tagged", "bare" or "listed"
        self._sent: bool | None = None  # for that call: None until its name is known, False if dropped
        self._value = _Value()  # a named tool_choice's arguments
        self._content_delta = ""
        self._deltas: list[ToolCallDelta] = []
        self._mode: Callable[[str], None] = self._text
        if use.choice == "required":
            self._mode = self._list_open
        elif use.choice != "auto":
            self._mode = self._named
            self._open_call(use.choice)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """The content and the tool-call deltas that text (the next of the output) lets out."""
        self._take(text)
        return self._flush()

    def finish(self, text: str = "") -> tuple[str, list[ToolCallDelta]]:
        """What the last of the output (text) and its end let out: what was held is content unless it
        was part of a call."""
        self._take(text)
        if self._call is not None:
            self._end_call()
        if self.use.choice == "auto" and self._mode != self._tail:
            self._release(self._held)  # the start of a tag, or a block that is not a call
        elif self.use.choice == "required" and not self.calls:
            self._release(self.text)  # no call came: all of it is content, as parse gives it
        if self.calls and not self.calls[-1].arguments:
            self._add_arguments("{}")  # a named choice's, when the output was empty
        self._emit("" if self.calls else self._space)
        return self._flush()

    def _take(self, text: str) -> None:
        self.text += text
        for ch in text:
            self._mode(ch)

    # -- text -----------------------------------------------------------------------------------------

    def _text(self, ch: str) -> None:
        """Plain text: content, but for an end that could begin "<tool_call>", or a "{" first."""
        if ch == "{" and not self._started:
            self._started = True
            self._begin_call("bare", ch)
            return
        self._started = self._started or not ch.isspace()
        held = self._held + ch
        start = _tag_start(held, _OPEN)
        self._release(held[:start])
        self._held = held[start:]
        if self._held == _OPEN:
            self._mode = self._block

    def _block(self, ch: str) -> None:
        """After "<tool_call>": whitespace, then the call's object."""
        if ch == "{":
            self._begin_call("tagged", ch)
        elif ch.isspace():
            self._held += ch
        else:
            self._not_a_call()
            self._mode(ch)

    def _tail(self, ch: str) -> None:
        """After a tagged call's object: the rest of its block, up to "</tool_call>", is dropped; a
        "<tool_call>" there begins the next block (the model left the closing tag out)."""
        held = self._held + ch
        self._held = held[_tag_start(held, _OPEN, _CLOSE) :]
        if self._held == _CLOSE:
            self._held, self._mode = "", self._text
        elif self._held == _OPEN:
            self._mode = self._block

    # -- "required": a list of calls, and a named function's arguments -------------------------------

    def _list_open(self, ch: str) -> None:
        if ch == "[":
            self._mode = self._list_item
        elif not ch.isspace():
            self._mode = self._ignore

    def _list_item(self, ch: str) -> None:
        if ch == "{":
            self._begin_call("listed", ch)
        elif not ch.isspace():
            self._mode = self._ignore

    def _list_next(self, ch: str) -> None:
        if ch == ",":
            self._mode = self._list_item
        elif not ch.isspace():
            self._mode = self._ignore  # "]", or a list that is not one of calls

    def _ignore(self, ch: str) -> None:
        """The rest of a "required" output after its list (or after what is not a list of calls)."""

    def _named(self, ch: str) -> None:
        self._value.feed(ch)
        self._add_arguments(self._value.text)

    # -- a call object ---------------------------------------------------------------------------------

    def _begin_call(self, kind: str, ch: str) -> None:
        self._call, self._kind, self._sent = _CallObject(), kind, None
        self._mode = self._in_call
        self._in_call(ch)

    def _in_call(self, ch: str) -> None:
        call = self._call
        fed = call.feed(ch)
        if self._sent is None:
            self._held += ch if fed else ""
            if call.name is not None:
                self._decide(call.name)
        if self._sent:
            self._add_arguments(call.arguments)
        unknown = self._sent is None and call.name is not None
        if fed and not call.done and not unknown:
            return
        self._end_call()
        if not fed:
            self._mode(ch)

    def _decide(self, name: str) -> None:
        """The call's name is known: send the call if it is one of the tools (and parallel_tool_calls
        allows another), drop it if not allowed; an unknown name leaves it undecided, to be text."""
        if name not in self.use.functions:
            return
        self._sent, self._held = self.use.parallel or not self.calls, ""
        if self._sent:
            self._open_call(name)

    def _end_call(self) -> None:
        """The call object ended (closed, malformed or cut off): a call sent gets "{}" if no arguments
        came; one that was undecided is not a call."""
        if self._sent is None:
            self._not_a_call()
            return
        if self._sent and not self.calls[-1].arguments:
            self._add_arguments("{}")
        self._call = None
        self._mode = {"tagged": self._tail, "bare": self._text, "listed": self._list_next}[self._kind]

    def _not_a_call(self) -> None:
        """What was held as a possible call is text: with "auto" content, as written, and what follows is
        parsed as text; a "required" output is not parsed further."""
        self._call = None
        if self.use.choice == "required":
            self._mode = self._ignore
            return
        held, self._held, self._mode = self._held, "", self._text
        self._release(held)

    # -- output ----------------------------------------------------------------------------------------

    def _release(self, text: str) -> None:
        """Text that is content; whitespace at its end waits for more (see the class's docstring)."""
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        if body and not self.content and self.calls:
            body = body.lstrip()
        self._emit(body)

    def _emit(self, content: str) -> None:
        self.content += content
        self._content_delta += content

    def _open_call(self, name: str) -> None:
        self.calls.append(ToolCall(name, ""))
        self._deltas.append(ToolCallDelta(len(self.calls) - 1, name))

    def _add_arguments(self, so_far: str) -> None:
        """The last call's arguments are now so_far (which only grows): send what is new of them."""
        call, index = self.calls[-1], len(self.calls) - 1
        new = so_far[len(call.arguments) :]
        if not new:
            return
        call.arguments = so_far
        if self._deltas and self._deltas[-1].index == index:
            self._deltas[-1].arguments += new
        else:
            self._deltas.append(ToolCallDelta(index, arguments=new))

    def _flush(self) -> tuple[str, list[ToolCallDelta]]:
        out = self._content_delta, self._deltas
        self._content_delta, self._deltas = "", []
        return out


def template_tool_calls(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool_calls with arguments as objects, as chat templates iterate them (the
    API sends them as JSON text)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    out = []
    for call in calls:
        function = dict(call.get("function") or {}) if isinstance(call, dict) else {}
        if isinstance(function.get("arguments"), str):
            with contextlib.suppress(json.JSONDecodeError):  # else the template gets the text as sent
                function["arguments"] = json.loads(function["arguments"])
        out.append({**call, "function": function} if isinstance(call, dict) else call)
    return message | {"tool_calls": out}
