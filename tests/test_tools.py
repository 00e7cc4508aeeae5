"""Tool calls (serve/tools.py): forced calls constrained by the function's schema, "auto" calls parsed
from the two common formats, tools given to the chat template, streams, and 400s for malformed tools."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import make_hf_model, write_byte_tokenizer
from megatier import MegatierError
from megatier.serve.protocol import ChatCompletionRequest, template_messages
from megatier.serve.tools import ToolUse
from megatier.tokenizer import Tokenizer
from serve_helpers import assert_refused, live_server, make_app

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}},
            "required": ["unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 200}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("tiny"), "llama-mqa-untied")
    write_byte_tokenizer(path)
    with live_server(make_app(path)) as (base, _):
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def check_weather_arguments(arguments: str) -> None:
    value = json.loads(arguments)
    assert set(value) == {"unit", "days"} and value["unit"] in ("c", "f") and isinstance(value["days"], int)


def test_a_named_tool_choice_forces_a_call_with_valid_arguments(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in (1, 2):
        out = client.chat.completions.create(**CHAT, tools=[WEATHER, TIME], tool_choice=choice, seed=seed)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.content is None
        (call,) = message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        check_weather_arguments(call.function.arguments)


def test_required_makes_the_model_call_one_of_the_tools(client):
    for seed in (3, 4, 5):
        out = client.chat.completions.create(
            **CHAT, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, seed=seed
        )
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls"
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            check_weather_arguments(call.function.arguments)
        else:
            assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_a_streamed_forced_call_arrives_whole_in_the_last_chunk(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(**CHAT, tools=[WEATHER], tool_choice=choice, stream=True, seed=4))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(not d.content for d in deltas)  # nothing of the call leaks out as content
    (call,) = deltas[-1].tool_calls
    assert call.index == 0 and call.function.name == "get_weather"
    check_weather_arguments(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_without_a_call_answers_with_content(client):
    out = client.chat.completions.create(**CHAT, tools=[WEATHER], tool_choice="auto", temperature=0)
    message = out.choices[0].message
    assert message.content and not message.tool_calls and out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', None, [("get_time", {})]),
        (
            'Let me look.<tool_call>{"name": "get_weather", "arguments": {"unit": "c", "days": 2}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>',
            "Let me look.",
            [("get_weather", {"unit": "c", "days": 2}), ("get_time", {})],
        ),
        (
            '{"name": "get_weather", "parameters": {"unit": "f", "days": 1}}',
            None,
            [("get_weather", {"unit": "f", "days": 1})],
        ),
        ('{"name": "launch_rockets", "arguments": {}}', '{"name": "launch_rockets", "arguments": {}}', []),
        ("<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
        ("It is sunny.", "It is sunny.", []),
    ],
)
def test_auto_parses_tagged_and_bare_json_calls_to_known_tools(text, content, calls):
    use = ToolUse.from_request([WEATHER, TIME], "auto")
    got_content, got = use.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


def test_tools_reach_the_chat_template_and_tool_call_arguments_become_objects(tmp_path):
    write_byte_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments.unit }}{% endfor %}"
        "{{ m.content or '' }}{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(tmp_path)
    call = {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"unit": "c"}'}}
    body = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "20", "tool_call_id": "1"},
        ],
        tools=[WEATHER, TIME],
    )
    assert tokenizer.decode(body.prompt_ids(tokenizer)) == "[get_weather][get_time]qc20"
    assert template_messages(body.messages)[1]["tool_calls"][0]["function"]["arguments"] == {"unit": "c"}
    none = ChatCompletionRequest(messages=[{"role": "user", "content": "q"}], tools=[WEATHER], tool_choice="none")
    assert tokenizer.decode(none.prompt_ids(tokenizer)) == "q"


def test_one_call_at_most_without_parallel_tool_calls():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 2
    assert len(ToolUse.from_request([TIME], "auto").parse(text)[1]) == 2
    assert len(ToolUse.from_request([TIME], "auto", parallel=False).parse(text)[1]) == 1
    assert ToolUse.from_request([TIME], "required", parallel=False).constraint().json_schema["maxItems"] == 1


def test_tool_use_checks():
    assert ToolUse.from_request(None, None) is None and ToolUse.from_request([WEATHER], "none") is None
    with pytest.raises(MegatierError, match="unique"):
        ToolUse.from_request([WEATHER, WEATHER], "auto")


REFUSED = {
    "required without tools": (CHAT | {"tool_choice": "required"}, "tool_choice"),
    "a named function not among the tools": (
        CHAT | {"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        "tool_choice",
    ),
    "a tool without a function": (CHAT | {"tools": [{"type": "function"}]}, "tools"),
    "a tool of another type": (CHAT | {"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools"),
    "an unknown tool_choice": (CHAT | {"tools": [TIME], "tool_choice": "always"}, "tool_choice"),
    "a forced call with response_format": (
        CHAT | {"tools": [TIME], "tool_choice": "required", "response_format": {"type": "json_object"}},
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_malformed_tool_requests_get_a_400_naming_the_field(url, case):
    assert_refused(url, "/v1/chat/completions", *REFUSED[case])
