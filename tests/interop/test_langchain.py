"""`langchain-openai` through Sovereign: a `bind_tools` loop, on chat completions and on
the Responses API (`use_responses_api=True`), invoked and streamed.

The loop is the one LangChain's docs show: invoke, run each tool call, append
its `ToolMessage`, invoke again until the model answers in text. It passes when
that text is built from the tool's result and the tool ran once per call.
With the Responses API, LangChain sends the earlier reasoning and message items
back as input, and reads reasoning from summary parts.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.interop.conftest import MODEL


def tools_and_counter() -> tuple[list, Counter]:
    calls: Counter = Counter()

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls["get_weather"] += 1
        return f"sunny in {city}"

    @tool
    def get_time(city: str) -> str:
        """The local time in a city."""
        calls["get_time"] += 1
        return f"noon in {city}"

    return [get_weather, get_time], calls


async def ask(llm, messages: list, streaming: bool) -> AIMessage:
    if not streaming:
        return await llm.ainvoke(messages)
    whole: AIMessageChunk | None = None
    async for chunk in llm.astream(messages):
        whole = chunk if whole is None else whole + chunk
    assert whole is not None
    return whole


async def tool_loop(llm, tools: list, question: str, streaming: bool, max_turns: int = 4) -> tuple[AIMessage, list]:
    by_name = {t.name: t for t in tools}
    messages: list = [HumanMessage(question)]
    for _ in range(max_turns):
        reply = await ask(llm, messages, streaming)
        messages.append(reply)
        if not reply.tool_calls:
            return reply, messages
        for call in reply.tool_calls:
            output = await by_name[call["name"]].ainvoke(call["args"])
            messages.append(ToolMessage(output, tool_call_id=call["id"]))
    raise AssertionError("the loop never reached a text answer")


@pytest.fixture
async def chat_model(interop):
    """`ChatOpenAI` on the gateway, with an HTTP client of this test's own.

    langchain-openai otherwise shares one cached client between instances, which
    outlives the event loop of the test that made it.
    """
    http = httpx.AsyncClient()

    def make(**kwargs) -> ChatOpenAI:
        return ChatOpenAI(model=MODEL, base_url=interop.v1, api_key=interop.key, max_retries=0,
                          http_async_client=http, **kwargs)

    yield make
    await http.aclose()


CASES = [pytest.param(responses, streaming, id=f"{'responses' if responses else 'chat'}-"
                      f"{'stream' if streaming else 'invoke'}")
         for responses in (False, True) for streaming in (False, True)]


@pytest.mark.parametrize(("use_responses_api", "streaming"), CASES)
async def test_bind_tools_loop(chat_model, use_responses_api, streaming):
    tools, calls = tools_and_counter()
    llm = chat_model(use_responses_api=use_responses_api, streaming=streaming)
    answer, messages = await tool_loop(llm.bind_tools(tools[:1]), tools, "Weather in Paris?", streaming)
    assert calls == {"get_weather": 1}
    ai = type(answer).__name__  # AIMessage, or AIMessageChunk when streamed
    assert [type(m).__name__ for m in messages] == ["HumanMessage", ai, "ToolMessage", ai]
    assert answer.text == "Done: get_weather returned sunny in value "
    if use_responses_api:
        # The provider's reasoning arrives as a summary LangChain shows as a reasoning block.
        reasoning = [block for block in answer.content if isinstance(block, dict) and block.get("type") == "reasoning"]
        assert [part["text"] for part in reasoning[0]["summary"]] == ["think think "]


@pytest.mark.parametrize(("use_responses_api", "streaming"), CASES)
async def test_parallel_tool_calls_each_run_once(chat_model, use_responses_api, streaming):
    tools, calls = tools_and_counter()
    llm = chat_model(use_responses_api=use_responses_api, streaming=streaming)
    answer, _ = await tool_loop(llm.bind_tools(tools), tools, "Weather and time?", streaming)
    assert calls == {"get_weather": 1, "get_time": 1}
    assert answer.text == "Done: get_weather returned sunny in value; get_time returned noon in value "
