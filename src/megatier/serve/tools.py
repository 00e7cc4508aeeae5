"""Tool calls on /v1/chat/completions.

The tools go to the model's chat template (its `tools` variable). With tool_choice "required" or a named
function the output is constrained by structured output to a call: for a named function, its arguments
(an object of the function's parameter schema); for "required", a JSON list of {"name", "arguments"}
objects, each for one of the tools. With "auto" (the default when tools are sent) the model chooses,
and its text is parsed for calls written the two ways chat templates teach: `<tool_call>{...}</tool_call>`
blocks (Hermes, Qwen 2.5/3, SmolLM3) and a reply that is one JSON object {"name", "arguments" or
"parameters"} (Llama 3.x). Calls to a name that is not among the tools are left as text.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from megatier.errors import MegatierError
from megatier.structured import StructuredOutput

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it

    def as_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


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
        """(the content left, the calls) of a finished output."""
        if self.choice not in ("auto", "required"):
            return None, [ToolCall(self.choice, _compact(text))]
        if self.choice == "required":
            try:
                return None, [_call(c) for c in json.loads(text)]
            except (json.JSONDecodeError, TypeError, KeyError):  # cut off by max_tokens: no whole call
                return text, []
        calls = [c for c in (_parse_call(m) for m in _TAGGED.findall(text)) if c and c.name in self.functions]
        if calls:
            rest = _TAGGED.sub("", text).strip()
            return rest or None, calls if self.parallel else calls[:1]
        whole = _parse_call(text.strip())
        if whole and whole.name in self.functions:
            return None, [whole]
        return text, []


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


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:  # cut off by max_tokens: the client gets what there is
        return text


def _call(obj: dict[str, Any]) -> ToolCall:
    arguments = obj["arguments"] if "arguments" in obj else obj["parameters"]
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _parse_call(text: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
        return _call(obj) if isinstance(obj, dict) and isinstance(obj.get("name"), str) else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


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
