"""The embedded default model (SmolLM2-135M-Instruct) answers through the public API, offline."""

from __future__ import annotations

import pytest

from megatier import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def test_chat_knows_the_capital_of_france(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=32)
    )
    assert "Paris" in out[0].text and out[0].finish_reason == "stop"


def test_streamed_chat_equals_the_batch_answer(llm):
    messages = [{"role": "user", "content": "Name a primary color."}]
    params = SamplingParams(temperature=0, max_tokens=24)
    assert "".join(llm.chat_stream(messages, params)) == llm.chat(messages, params)[0].text
