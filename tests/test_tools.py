"""Tool calls (serve/tools.py): forced calls constrained by the function's schema, "auto" calls parsed
from the two common formats, tools given to the chat template, streams, and 400s for malformed tools."""

from __future__ import annotations

import json
import random

import openai
import pytest

from conftest import make_hf_model, write_byte_tokenizer
from megatier import MegatierError
from megatier.serve.protocol import ChatCompletionRequest, template_messages
from megatier.serve.tools import ToolCall, ToolCallDelta, ToolCallStream, ToolUse
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


def streamed_calls(chunks) -> tuple[str, list[tuple[str, str]]]:
    """(the content, the calls as (name, arguments)) that a client adds up from a chat stream's deltas,
    checking that each call's first delta names it (with an id) and the others only add arguments."""
    content, calls, ids = "", [], set()
    for chunk in chunks:
        delta = chunk.choices[0].delta if chunk.choices else None
        content += (delta and delta.content) or ""
        for call in (delta and delta.tool_calls) or []:
            if call.index == len(calls):
                assert call.id.startswith("call_") and call.id not in ids and call.function.name
                ids.add(call.id)
                calls.append((call.function.name, ""))
            else:
                assert call.index == len(calls) - 1 and call.id is None and call.function.name is None
            calls[-1] = (calls[-1][0], calls[-1][1] + call.function.arguments)
    return content, calls


@pytest.mark.parametrize("choice", ["get_weather", "required"])
def test_a_streamed_forced_call_sends_its_arguments_as_they_grow(client, choice):
    forced = {"type": "function", "function": {"name": choice}} if choice != "required" else choice
    args = CHAT | {"tools": [WEATHER], "tool_choice": forced, "seed": 4 if choice != "required" else 1}
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(**args, stream=True))
    content, calls = streamed_calls(chunks)
    assert not content  # nothing of a call leaks out as content
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    argument_chunks = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(argument_chunks) > 3  # streamed, not sent whole at the end
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"
    assert len(calls) == (1 if choice != "required" else 2)  # this seed's list has two calls
    for name, arguments in calls:
        assert name == "get_weather"
        check_weather_arguments(arguments)


def test_an_auto_stream_sends_content_and_calls_as_a_whole_response_gives_them(client):
    """A guided_choice makes the tiny model write a reply with a call (one byte a token), streamed as it
    is generated: the content first, then the call's deltas."""
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", "days": 2}}\n</tool_call>'
    args = CHAT | {"tools": [WEATHER, TIME], "extra_body": {"guided_choice": [text]}, "logprobs": True}
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.message.content == "Let me look." and whole.finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert streamed_calls(chunks) == (
        "Let me look.",
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls],
    )
    deltas = [c.choices[0].delta for c in chunks[1:]]
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert "".join(d.content or "" for d in deltas[:first_call]) == "Let me look."  # before the call came
    assert sum(len(c.choices[0].logprobs.content) for c in chunks[1:]) == len(whole.logprobs.content)
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


GET_WEATHER = '{"name": "get_weather", "arguments": {"unit": "c", "days": 2}}'
GET_TIME = '{"name": "get_time", "arguments": {}}'
# (text, the content, the calls as (name, arguments)) of "auto" with [WEATHER, TIME].
AUTO_CASES = [
    ("  x < y, a <b> and <tool_c\n", "  x < y, a <b> and <tool_c\n", []),  # a tag's start held, then let out
    (
        f"Let me look.\n<tool_call>\n{GET_WEATHER}\n</tool_call>\n",
        "Let me look.",
        [("get_weather", '{"unit": "c", "days": 2}')],
    ),
    (
        f"\n<tool_call>{GET_TIME}</tool_call> <tool_call> {GET_WEATHER} </tool_call>\n\nDone. ",
        "Done.",
        [("get_time", "{}"), ("get_weather", '{"unit": "c", "days": 2}')],
    ),
    (  # an unknown name and a malformed block stay text, as written; the known call around them is a call
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call> then '
        f"<tool_call>{GET_TIME}</tool_call><tool_call>{{not json</tool_call>",
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call> then <tool_call>{not json</tool_call>',
        [("get_time", "{}")],
    ),
    (  # spaced as json.dumps writes it; strings (braces, quotes, escapes, a closing tag) kept as written
        '<tool_call>{"arguments":{"unit" :"c","days":[1,2.5e3,{"s":"a}\\"</tool_call>\\u00e9"}], "x": null},'
        '"name":"get_weather"}</tool_call>',
        None,
        [("get_weather", '{"unit": "c", "days": [1, 2.5e3, {"s": "a}\\"</tool_call>\\u00e9"}], "x": null}')],
    ),
    ('<tool_call>{"name": "get_time", "arguments": "{ }"}</tool_call>', None, [("get_time", "{}")]),  # JSON text
    ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")]),  # no arguments
    (f"<tool_call>{GET_TIME}\n<tool_call>{GET_TIME}", None, [("get_time", "{}")] * 2),  # closing tags left out
    (f"<tool_call>{GET_TIME} trailing junk</tool_call>ok", "ok", [("get_time", "{}")]),
    (
        '\n{"name": "get_weather", "parameters": {"unit": "f", "days": 1}}',
        None,
        [("get_weather", '{"unit": "f", "days": 1}')],
    ),
    ('{"answer": 42} is JSON, not a call', '{"answer": 42} is JSON, not a call', []),
    ('{"name": 42}', '{"name": 42}', []),
    # Cut off (max_tokens) or malformed: before the name is known, text; after, a call as far as it came.
    ('Hmm <tool_call>{"name": "get_wea', 'Hmm <tool_call>{"name": "get_wea', []),
    ("Hmm <tool_call>", "Hmm <tool_call>", []),
    ('<tool_call>{"name": "get_weather", "arguments": {"unit": "c", "da', None, [("get_weather", '{"unit": "c", "da')]),
    ('<tool_call>{"name": "get_time", "arguments": {}} oops}</tool_call>', None, [("get_time", "{}")]),
    ('<tool_call>{"name": "get_time", "arguments": {}', None, [("get_time", "{}")]),
    ('<tool_call>{"name": "get_time", "argu', None, [("get_time", "{}")]),
]


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    """text split at every character boundary, one character a piece, and at random places."""
    rng = random.Random(seed)
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text) or [""]]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8)))) if len(text) > 1 else []
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return splits


def run_stream(use: ToolUse, pieces: list[str]) -> tuple[list[str], list[ToolCallDelta]]:
    """The content deltas and the tool-call deltas of a stream fed `pieces`, then finished."""
    stream = ToolCallStream(use)
    contents, deltas = [], []
    for i, piece in enumerate(pieces):
        content, calls = (stream.finish if i == len(pieces) - 1 else stream.feed)(piece)
        contents.append(content)
        deltas += calls
    return contents, deltas


def added_up(deltas: list[ToolCallDelta]) -> list[tuple[str, str]]:
    """The calls a client adds up from the deltas; each call's first names it, the others add arguments."""
    calls: list[tuple[str, str]] = []
    for d in deltas:
        if d.name is not None:
            assert d.index == len(calls)
            calls.append((d.name, ""))
        assert d.index == len(calls) - 1
        calls[-1] = (calls[-1][0], calls[-1][1] + d.arguments)
    return calls


def check_stream_agrees_with_parse(use: ToolUse, text: str) -> None:
    """Fed in any pieces, the stream's content and calls add up to the whole text's parse (the content is
    the text itself without calls), and no content delta holds text of a call."""
    content, calls = use.parse(text)
    expected = [(c.name, c.arguments) for c in calls]
    for pieces in chunkings(text):
        contents, deltas = run_stream(use, pieces)
        assert "".join(contents) == (content or ""), pieces
        assert added_up(deltas) == expected, pieces
        if calls:
            assert not any(f'"{c.name}"' in piece for c in calls for piece in contents), pieces


@pytest.mark.parametrize(("text", "content", "calls"), AUTO_CASES)
def test_auto_calls_are_parsed_and_streamed_alike_at_every_split(text, content, calls):
    """Beyond the cases above: whitespace, text between and after calls, blocks that are not calls, the
    arguments' spacing, and calls cut off or malformed, where what a stream sent stands (a call whose name
    was sent stays a call, with the arguments as far as they came), and parse agrees."""
    use = ToolUse.from_request([WEATHER, TIME], "auto")
    got_content, got = use.parse(text)
    assert (got_content, [(c.name, c.arguments) for c in got]) == (content if calls else text, calls)
    check_stream_agrees_with_parse(use, text)


def test_content_streams_at_once_but_for_what_may_begin_a_call():
    """Fed a character at a time, content comes out as soon as it cannot be a call: only trailing
    whitespace and an end that may begin "<tool_call>" wait; a reply starting with "{" waits until it
    cannot be a call; a call's name comes as its string closes, then its arguments a character at a time."""
    use = ToolUse.from_request([WEATHER, TIME], "auto")
    text = "Sun <b> x <tool"
    stream = ToolCallStream(use)
    for i, ch in enumerate(text):
        stream.feed(ch)
        tag = next((j for j in range(i + 1) if "<tool_call>".startswith(text[j : i + 1])), i + 1)
        assert stream.content == text[:tag].rstrip()
    bare = ToolCallStream(use)
    assert [bare.feed(ch)[0] for ch in '{"answer": 4}!'] == [""] * 12 + ['{"answer": 4}', "!"]
    call = ToolCallStream(use)
    out = [call.feed(ch)[1] for ch in f"<tool_call>{GET_WEATHER}"]
    named = GET_WEATHER.index("get_weather") + len("get_weather") + len("<tool_call>")
    assert not any(out[:named]) and out[named] == [ToolCallDelta(0, "get_weather")]
    arguments = [d.arguments for deltas in out[named + 1 :] for d in deltas]
    assert "".join(arguments) == '{"unit": "c", "days": 2}' and max(map(len, arguments)) == 2  # ":" gets its " "


@pytest.mark.parametrize("parallel", [True, False])
def test_one_call_streamed_at_most_without_parallel_tool_calls(parallel):
    use = ToolUse.from_request([TIME], "auto", parallel=parallel)
    text = f"<tool_call>{GET_TIME}</tool_call>\n<tool_call>{GET_TIME}</tool_call> Bye"
    assert use.parse(text) == ("Bye", [ToolCall("get_time", "{}")] * (2 if parallel else 1))
    check_stream_agrees_with_parse(use, text)


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        (' [ {"name": "get_time", "arguments": {}},{"name":"get_weather","arguments":{"unit":"f","days":3}}]', None),
        ('[{"name": "get_weather", "arguments": {"unit": "c", "da', None),  # cut off: as far as it came
        ('[{"name": "get_we', []),  # cut before a name: no call, the text is the content
    ],
)
def test_required_lists_are_parsed_and_streamed_alike(text, calls):
    use = ToolUse.from_request([WEATHER, TIME], "required")
    content, got = use.parse(text)
    assert (content is None) == bool(got) and (calls is None or [(c.name, c.arguments) for c in got] == calls)
    check_stream_agrees_with_parse(use, text)


def test_a_named_choice_streams_its_arguments_from_the_start():
    use = ToolUse.from_request([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert use.parse(' {"unit":"c" ,\n "days" : 2 }') == (None, [ToolCall("get_weather", '{"unit": "c", "days": 2}')])
    assert use.parse("") == (None, [ToolCall("get_weather", "{}")])
    assert ToolCallStream(use).feed("") == ("", [ToolCallDelta(0, "get_weather")])  # the name before any text
    check_stream_agrees_with_parse(use, '{"unit": "f", "days": 12}')
    check_stream_agrees_with_parse(use, '{"unit": "f", "da')


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
