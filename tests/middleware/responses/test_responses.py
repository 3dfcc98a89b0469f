"""The Responses API over chat completions: JSON replies, request mapping, chaining, errors.

The official SDK with strict response validation is the client; the simulated
provider records what reached it, so the chat mapping is checked there.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import openai
import pydantic
import pytest
from aiohttp import web

from tests.support import make_settings, provider

MODEL = "sovereign-alpha"


@pytest.fixture
async def running(mock, gateway_factory, store_url, redis_prefix):
    return await gateway_factory(make_settings(mock.url, store_url=store_url, prefix=redis_prefix, pipeline=["responses"]))


@pytest.fixture
def client(running):
    return running.openai(_strict_response_validation=True)


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


async def test_plain_text_and_instructions(client, mock):
    response = await client.responses.create(model=MODEL, input="hello world", instructions="Answer briefly.")
    assert response.id.startswith("resp_")
    assert response.object == "response" and response.status == "completed"
    assert response.model == MODEL  # the public name, not the provider's
    assert response.output_text == "hello world " * 4
    assert response.instructions == "Answer briefly."
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].annotations == []
    assert response.usage.output_tokens == 8
    assert response.usage.total_tokens == response.usage.input_tokens + 8
    assert response.usage.input_tokens_details.cached_tokens == 0
    sent = mock.requests[-1]["body"]
    assert sent["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "hello world"},
    ]
    assert sent["model"] == "mock-model" and "stream" not in sent and "input" not in sent


async def test_request_fields_map_to_chat(client, mock):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    response = await client.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "dev rules"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "part one"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "user", "content": "go on"},
        ],
        temperature=0.3,
        top_p=0.9,
        max_output_tokens=50,
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
        reasoning={"effort": "low"},
        metadata={"k": "v"},
        user="end-user-1",
    )
    sent = mock.requests[-1]["body"]
    assert sent["messages"] == [
        {"role": "system", "content": "dev rules"},
        {"role": "user", "content": "part one"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "go on"},
    ]
    assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9
    assert sent["max_completion_tokens"] == 50
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert sent["reasoning_effort"] == "low"
    assert sent["metadata"] == {"k": "v"} and sent["user"] == "end-user-1"
    # The request is echoed in the Response.
    assert response.temperature == 0.3 and response.max_output_tokens == 50
    assert response.text.format.type == "json_schema" and response.reasoning.effort == "low"
    assert response.metadata == {"k": "v"}


async def test_function_tool_round_trip(client, mock):
    first = await client.responses.create(model=MODEL, input="weather in Paris?", tools=[WEATHER_TOOL], tool_choice="auto")
    sent = mock.requests[-1]["body"]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_TOOL["parameters"], "strict": True}}]
    assert sent["tool_choice"] == "auto"
    assert first.tools[0].name == "get_weather"
    call = first.output[0]
    assert call.type == "function_call" and call.id.startswith("fc_")
    assert call.call_id.startswith("call_") and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "value"}

    second = await client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}],
    )
    assert second.previous_response_id == first.id
    assert second.output_text == 'Done: get_weather returned {"temp": 21} '  # the provider used the result
    messages = mock.requests[-1]["body"]["messages"]
    assert messages == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
    ]


async def test_function_call_items_merge_into_one_assistant_turn(client, mock):
    await client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "two calls"},
            {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{\"x\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        ],
        tools=[{"type": "function", "name": "a", "parameters": {"type": "object", "properties": {}}},
               {"type": "function", "name": "b", "parameters": {"type": "object", "properties": {}}}],
        tool_choice={"type": "function", "name": "b"},
        parallel_tool_calls=False,
    )
    sent = mock.requests[-1]["body"]
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "b"}}
    assert sent["parallel_tool_calls"] is False


async def test_three_turn_chain_drops_earlier_instructions(client, mock):
    one = await client.responses.create(model=MODEL, input="alpha", instructions="first rules")
    two = await client.responses.create(model=MODEL, input="beta", previous_response_id=one.id)
    three = await client.responses.create(
        model=MODEL, input="gamma", previous_response_id=two.id, instructions="third rules")
    assert three.output_text == "gamma " * 8
    assert mock.requests[-1]["body"]["messages"] == [
        {"role": "system", "content": "third rules"},
        {"role": "user", "content": "alpha"},
        {"role": "assistant", "content": one.output_text},
        {"role": "user", "content": "beta"},
        {"role": "assistant", "content": two.output_text},
        {"role": "user", "content": "gamma"},
    ]
    # Turn two had no instructions: the first turn's did not travel with it.
    assert mock.requests[-2]["body"]["messages"][0] == {"role": "user", "content": "alpha"}


async def test_reasoning_content_becomes_a_reasoning_item(client):
    response = await client.responses.create(
        model=MODEL, input="think hard", extra_headers={"x-mock-reasoning-chunks": "3"})
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    # The default `reasoning: summary` (tests/middleware/responses/test_responses_reasoning.py has the others).
    assert [(s.type, s.text) for s in reasoning.summary] == [("summary_text", "think " * 3)]
    assert reasoning.content is None
    assert message.type == "message" and response.output_text == "think hard " * 4
    assert response.usage.output_tokens_details.reasoning_tokens == 3


async def test_max_output_tokens_gives_incomplete(client):
    response = await client.responses.create(model=MODEL, input="long story", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.output_text == "long story long "


async def test_unsupported_tool_type(client, mock):
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="x", tools=[WEATHER_TOOL, {"type": "web_search"}])
    error = info.value.body
    assert error["code"] == "unsupported_tool" and error["param"] == "tools[1].type"
    assert mock.requests == []


async def test_unknown_previous_response_id(client, mock):
    for bad in ("resp_doesnotexist", "not-an-id:*"):
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(model=MODEL, input="x", previous_response_id=bad)
        assert info.value.body["code"] == "previous_response_not_found"
        assert info.value.body["param"] == "previous_response_id"
    assert mock.requests == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": 5}, "input"),
        ({"input": [{"type": "file_search_call", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
        ({"input": "x", "tool_choice": {"type": "mcp"}}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "temperature": "hot"}, "temperature"),
        ({"input": "x", "top_p": 1.5}, "top_p"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"input": "x", "metadata": []}, "metadata"),
        ({}, "input"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(client, mock, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        await client.post("/responses", body={"model": MODEL, **body}, cast_to=object)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    assert mock.requests == []


async def test_provider_error_passes_through(client):
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="x", extra_headers={"x-mock-fail-status": "400"})
    assert info.value.body["code"] == "mock_failure"
    with pytest.raises(openai.InternalServerError) as info:
        await client.responses.create(model=MODEL, input="x", extra_headers={"x-mock-fail-status": "500"})
    assert info.value.status_code == 502 and info.value.body["code"] == "upstream_error"


async def test_chat_completions_pass_through_untouched(client, mock):
    completion = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}])
    assert completion.object == "chat.completion"
    assert "stream_options" not in mock.requests[-1]["body"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "sovereign-alpha", "input": [{"role": "user", "content": [{"type": ["x"], "text": "a"}]}]},
        {"model": "sovereign-alpha", "input": "hi", "reasoning": {"effort": ["low"]}},
    ],
)
async def test_odd_values_are_a_400_even_without_the_validation_unit(mock, gateway_factory, body):
    import aiohttp

    from tests.support import make_settings

    running = await gateway_factory(make_settings(mock.url, admin_token=None, pipeline=["responses"]))
    async with aiohttp.ClientSession() as session:
        async with session.post(running.v1 + "/responses", json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert mock.requests == []


class Answer(pydantic.BaseModel):
    city: str


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_refusal_is_a_refusal_part_the_sdk_reports(client, mock, stream):
    """A provider's `refusal` (structured outputs send it instead of content) reaches the client.

    Before, the output was empty with `status: completed`, so `responses.parse`
    found neither a parsed answer nor a refusal (the Agents SDK retried until its
    max_turns, LangChain raised on a reply with neither).
    """
    headers = {"x-mock-refuse": "I cannot help with that."}
    if stream:
        async with client.responses.stream(model=MODEL, input="where?", text_format=Answer, extra_headers=headers) as events:
            kinds = [event.type async for event in events]
            response = await events.get_final_response()
        assert kinds.count("response.refusal.delta") == 5  # one per provider chunk
        assert "response.refusal.done" in kinds and "response.output_text.delta" not in kinds
    else:
        response = await client.responses.parse(model=MODEL, input="where?", text_format=Answer, extra_headers=headers)
    assert response.status == "completed" and response.output_parsed is None
    (message,) = response.output
    assert message.type == "message" and [part.type for part in message.content] == ["refusal"]
    assert message.content[0].refusal == "I cannot help with that. "
    # The chained turn reads the refusal as what the assistant said.
    await client.responses.create(model=MODEL, input="why?", previous_response_id=response.id)
    assert mock.requests[-1]["body"]["messages"][1] == {"role": "assistant", "content": "I cannot help with that. "}


def _scripted(reply: dict) -> Any:
    """A provider that answers every request with `reply` as JSON, status 200, streamed or not."""
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(reply)
    return handler


COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "mock-model",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me look.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}


async def _scripted_client(gateway_factory, redis_prefix, reply: dict):
    stack = contextlib.AsyncExitStack()
    url = await stack.enter_async_context(provider(_scripted(reply)))
    running = await gateway_factory(make_settings(url, store_url="memory://", prefix=redis_prefix, pipeline=["responses"]))
    return stack, running.openai(_strict_response_validation=True)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_200_error_body_from_the_provider_is_a_502(gateway_factory, redis_prefix, stream):
    """OpenRouter-style providers answer some failures with 200 and `{"error": …}`; the SDK used to crash on it."""
    stack, client = await _scripted_client(gateway_factory, redis_prefix, {"error": {"message": "Provider returned error", "code": 502}})
    async with stack:
        with pytest.raises(openai.InternalServerError) as info:
            await client.responses.create(model=MODEL, input="x", stream=stream)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error" and "Provider returned error" in info.value.body["message"]


async def test_a_provider_that_ignores_stream_still_gives_the_event_sequence(gateway_factory, redis_prefix):
    stack, client = await _scripted_client(gateway_factory, redis_prefix, COMPLETION)
    async with stack:
        async with client.responses.stream(model=MODEL, input="weather?", tools=[WEATHER_TOOL]) as events:
            kinds = [event.type async for event in events]
            final = await events.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.function_call_arguments.delta" in kinds
    message, call = final.output
    assert final.output_text == "Let me look."
    assert (call.type, call.call_id, call.name, call.arguments) == ("function_call", "call_1", "get_weather", '{"city":"Paris"}')
    assert final.usage.output_tokens == 7


async def test_assistant_text_after_its_tool_calls_stays_in_their_turn(client, mock):
    """A streamed turn lists its function calls before the text that followed them; the tool results must still follow the calls."""
    await client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "I called it."}]},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ], tools=[WEATHER_TOOL])
    assert mock.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "I called it.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]


async def test_allowed_tools_choice_maps_to_chat(client, mock):
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]}
    response = await client.responses.create(model=MODEL, input="weather?", tools=[WEATHER_TOOL], tool_choice=choice)
    assert mock.requests[-1]["body"]["tool_choice"] == {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}}
    assert response.tool_choice.type == "allowed_tools"
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="x", tools=[WEATHER_TOOL],
                                      tool_choice={**choice, "tools": [{"type": "web_search"}]})
    assert info.value.body["param"] == "tool_choice.tools[0]"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_top_logprobs_reach_the_provider_and_come_back_on_the_text(client, mock, stream):
    """`top_logprobs` with `include: ["message.output_text.logprobs"]`, as the Agents SDK sends it; both used to be dropped."""
    kwargs = {"model": MODEL, "input": "two words", "top_logprobs": 2, "include": ["message.output_text.logprobs"]}
    if stream:
        async with client.responses.stream(**kwargs) as events:
            deltas = [event async for event in events if event.type == "response.output_text.delta"]
            response = await events.get_final_response()
        assert [len(delta.logprobs) for delta in deltas] == [1] * 8  # one token per provider chunk
    else:
        response = await client.responses.create(**kwargs)
    sent = mock.requests[-1]["body"]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2 and "include" not in sent
    assert response.top_logprobs == 2
    logprobs = response.output[0].content[0].logprobs
    assert [entry.token for entry in logprobs] == ["two ", "words "] * 4
    assert [alt.token for alt in logprobs[0].top_logprobs] == ["two ", "alt1"]
    plain = await client.responses.create(model=MODEL, input="two words")
    assert plain.output[0].content[0].logprobs == [] and "logprobs" not in mock.requests[-1]["body"]
