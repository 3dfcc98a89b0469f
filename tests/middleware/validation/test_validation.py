"""The validation unit and the route-level body checks, over real sockets.

Gateways run the pipeline ["validation", "legacy_functions"] in front of the
simulated provider; every rejection must be an exact OpenAI-shaped 4xx and
must not reach the provider (`mock.requests` stays empty).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from middleware.validation.unit import ValidationUnit, validate_body
from proxy.core.call import CHAT, RESPONSES, Call, Principal, Reply
from proxy.core.errors import ApiError
from proxy.core.pipeline import registered_units, Unit
from tests.support import make_settings

PIPELINE = ["validation", "legacy_functions"]
MODEL = "sovereign-alpha"
USER = {"role": "user", "content": "hello"}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [USER], **fields}


@pytest.fixture
async def gw(mock, gateway_factory):
    return await gateway_factory(make_settings(mock.url, pipeline=PIPELINE))


async def post(url: str, body: Any = None, *, data: Any = None, headers: dict[str, str] | None = None):
    """POST raw bytes (or JSON) and return (status, parsed JSON or text)."""
    if data is None:
        data = orjson.dumps(body)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as resp:
            text = await resp.read()
            try:
                return resp.status, orjson.loads(text)
            except orjson.JSONDecodeError:
                return resp.status, text


def error(message: str, param: str | None, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


# --------------------------------------------------------------- chat rejections

CHAT_REJECTIONS = [
    # (body, param, code, message)
    (chat(temperature="1"), "temperature", "invalid_value",
     "Invalid type for 'temperature': expected a number, but got a string instead."),
    (chat(temperature=True), "temperature", "invalid_value",
     "Invalid type for 'temperature': expected a number, but got a boolean instead."),
    (chat(temperature=2.5), "temperature", "invalid_value",
     "Invalid value for 'temperature': input should be less than or equal to 2, but got 2.5."),
    (chat(top_p=1.5), "top_p", "invalid_value", None),
    (chat(top_p=-0.1), "top_p", "invalid_value", None),
    (chat(n=0), "n", "invalid_value", None),
    (chat(n=1.0), "n", "invalid_value", None),
    (chat(max_tokens=0), "max_tokens", "invalid_value", None),
    (chat(max_completion_tokens=-1), "max_completion_tokens", "invalid_value", None),
    (chat(stream="true"), "stream", "invalid_value",
     "Invalid type for 'stream': expected a boolean, but got a string instead."),
    (chat(stream=True, stream_options=True), "stream_options", "invalid_value", None),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", "invalid_value", None),
    (chat(response_format={"type": "xml"}), "response_format.type", "invalid_value",
     "Invalid value for 'response_format.type': 'xml'. Supported values are: 'text', 'json_object', 'json_schema'."),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema", "missing_required_parameter",
     "Missing required parameter: 'response_format.json_schema'."),
    (chat(tools=[{"type": "retrieval"}]), "tools[0].type", "invalid_value", None),
    (chat(tools=[{"type": "function", "function": {"description": "x"}}]), "tools[0].function.name",
     "missing_required_parameter", "Missing required parameter: 'tools[0].function.name'."),
    (chat(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools[0].function.name", "invalid_value", None),
    (chat(tool_choice="sometimes"), "tool_choice", "invalid_value",
     "Invalid value for 'tool_choice': 'sometimes'. Supported values are: 'none', 'auto' or 'required'."),
    (chat(tool_choice=7), "tool_choice", "invalid_value",
     "Invalid type for 'tool_choice': expected a string ('none', 'auto' or 'required') or an object, "
     "but got an integer instead."),
    (chat(tool_choice={"type": "function"}), "tool_choice.function", "missing_required_parameter", None),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value", None),
    (chat(functions=[{"name": "f"}], function_call={"nam": "f"}), "function_call.name", "missing_required_parameter", None),
    ({"messages": [USER]}, "model", "missing_required_parameter", "Missing required parameter: 'model'."),
    ({"model": MODEL}, "messages", "missing_required_parameter", "Missing required parameter: 'messages'."),
    ({"model": 5, "messages": [USER]}, "model", "invalid_value", None),
    ({"model": MODEL, "messages": []}, "messages", "invalid_value", None),
    ({"model": MODEL, "messages": "hello"}, "messages", "invalid_value", None),
    ({"model": MODEL, "messages": [USER, "hi"]}, "messages[1]", "invalid_value", None),
    ({"model": MODEL, "messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter", None),
    ({"model": MODEL, "messages": [USER, {"role": "robot", "content": "x"}]}, "messages[1].role", "invalid_value",
     "Invalid value for 'messages[1].role': 'robot'. Supported values are: 'system', 'developer', 'user', "
     "'assistant', 'tool', 'function'."),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_value",
     "Invalid type for 'messages[0].content': expected a string or an array, but got an integer instead."),
    ({"model": MODEL, "messages": [USER, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
     "messages[1].content[1].text", "missing_required_parameter", None),
    ({"model": MODEL, "messages": [USER, USER, {"role": "user", "content": [{"type": "video"}]}]},
     "messages[2].content[0].type", "invalid_value", None),
    ({"model": MODEL, "messages": [{"role": "assistant"}]}, "messages[0].content", "missing_required_parameter", None),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "r"}]}, "messages[0].tool_call_id",
     "missing_required_parameter", None),
    ({"model": MODEL, "messages": [{"role": "function", "content": "r"}]}, "messages[0].name",
     "missing_required_parameter", None),
    ({"model": MODEL, "messages": [{"role": "assistant", "tool_calls": [{"type": "function", "id": "c", "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "missing_required_parameter", None),
]


@pytest.mark.parametrize(("body", "param", "code", "message"), CHAT_REJECTIONS)
async def test_chat_rejections(gw, mock, body, param, code, message):
    status, reply = await post(gw.v1 + "/chat/completions", body)
    assert status == 400, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    if message is not None:
        assert err["message"] == message
    assert mock.requests == []


# --------------------------------------------------------------- media

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
FILE = {"type": "file", "file": {"file_id": "file-1"}}

MEDIA = [
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, IMAGE]}]},
     "unsupported_image_input", "messages[0].content[1]"),
    ("/chat/completions", {"model": MODEL, "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [IMAGE]}]},
     "unsupported_image_input", "messages[1].content[0]"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": [IMAGE]}]},
     "unsupported_image_input", "messages[0].content[0]"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [AUDIO]}]},
     "unsupported_audio_input", "messages[0].content[0]"),
    ("/chat/completions", {"model": MODEL, "messages": [USER, {"role": "user", "content": [FILE]}]},
     "unsupported_file_input", "messages[1].content[0]"),
    # Media win over other errors in the same body.
    ("/chat/completions", {"model": MODEL, "temperature": 9, "messages": [{"role": "user", "content": [IMAGE]}]},
     "unsupported_image_input", "messages[0].content[0]"),
    ("/responses", {"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "https://example.com/a.png"}]}]},
     "unsupported_image_input", "input[0].content[1]"),
    ("/responses", {"model": MODEL, "input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image", "file_id": "f"}]}]},
     "unsupported_image_input", "input[1].output[0]"),
    ("/responses", {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "unsupported_file_input", "input[0].content[0]"),
    ("/responses", {"model": MODEL, "input": [{"type": "message", "role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}]}]},
     "unsupported_audio_input", "input[0].content[0]"),
]


@pytest.mark.parametrize(("path", "body", "code", "param"), MEDIA)
async def test_media_inputs_are_refused_exactly(gw, mock, path, body, code, param):
    status, reply = await post(gw.v1 + path, body)
    assert status == 400
    kind = code.split("_")[1].capitalize()  # unsupported_image_input -> Image
    assert reply == error(f"{kind} inputs are not supported by this gateway ({code}).", param, code)
    assert mock.requests == []


async def test_sdk_image_input_is_a_bad_request(gw, mock):
    client = gw.openai()
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "what is this"}, IMAGE]}]
        )
    assert info.value.status_code == 400
    assert info.value.code == "unsupported_image_input"
    assert info.value.body["message"] == "Image inputs are not supported by this gateway (unsupported_image_input)."
    assert info.value.param == "messages[0].content[1]"
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(
            model=MODEL, input=[{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png", "detail": "auto"}]}]
        )
    assert info.value.code == "unsupported_image_input"
    assert mock.requests == []


async def test_sdk_reports_param_of_bad_values(gw, mock):
    client = gw.openai()
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=[USER], temperature="1")  # type: ignore[arg-type]
    assert (info.value.param, info.value.code) == ("temperature", "invalid_value")
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=[USER, {"role": "user"}])  # type: ignore[list-item]
    assert (info.value.param, info.value.code) == ("messages[1].content", "missing_required_parameter")
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="hi", max_output_tokens=0)
    assert info.value.param == "max_output_tokens"
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-unknown", messages=[USER])
    assert info.value.code == "model_not_found"
    assert mock.requests == []


# --------------------------------------------------------------- what passes


async def test_valid_bodies_pass_with_unknown_and_legacy_fields(gw, mock):
    body = chat(
        temperature=0, top_p=1, n=2, max_tokens=5, stream=False, seed=7, stop="x", user="u",
        response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}}},
        metadata={"k": "v"}, future_field={"nested": [1, 2, {"x": None}]}, temperature_extra="ignored",
    )
    status, reply = await post(gw.v1 + "/chat/completions", body)
    assert status == 200, reply
    assert len(reply["choices"]) == 2
    forwarded = mock.requests[-1]["body"]
    assert forwarded["future_field"] == {"nested": [1, 2, {"x": None}]}
    assert forwarded["response_format"] == body["response_format"]

    legacy = {
        "model": MODEL,
        "messages": [
            USER,
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "name": "f", "content": "42"},
        ],
        "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
        "function_call": "auto",
    }
    status, reply = await post(gw.v1 + "/chat/completions", legacy)
    assert status == 200, reply


async def test_unknown_model_is_404(gw, mock):
    status, reply = await post(gw.v1 + "/chat/completions", {"model": "gpt-nope", "messages": [USER]})
    assert status == 404
    assert reply["error"]["code"] == "model_not_found" and reply["error"]["param"] == "model"
    status, reply = await post(gw.v1 + "/responses", {"model": "gpt-nope", "input": "hi"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    assert mock.requests == []


class OnlyBetaUnit(Unit):
    """Test stand-in for auth: every caller's key may use only `sovereign-beta`."""

    name = "only_beta"

    async def __call__(self, call: Call, next):
        call.principal = Principal(tenant="t", key_id="k", models=frozenset({"sovereign-beta"}))
        return await next(call)


async def test_model_the_key_may_not_use_is_404(mock, gateway_factory, monkeypatch):
    monkeypatch.setitem(registered_units(), "only_beta", f"{__name__}:OnlyBetaUnit")
    settings = make_settings(
        mock.url,
        pipeline=["only_beta", *PIPELINE],
        models={"sovereign-beta": {"upstream": "default", "free": True}},
    )
    running = await gateway_factory(settings)
    status, reply = await post(running.v1 + "/chat/completions", chat())
    assert status == 404
    assert reply["error"]["message"] == f"The model `{MODEL}` does not exist or you do not have access to it."
    assert mock.requests == []
    status, reply = await post(running.v1 + "/chat/completions", {"model": "sovereign-beta", "messages": [USER]})
    assert status == 200


RESPONSES_VALID = [
    {"model": MODEL, "input": "hi"},
    {"model": MODEL, "input": [{"role": "user", "content": "hi"}], "instructions": "be brief", "store": False,
     "metadata": {"a": "b"}, "temperature": 1, "top_p": 0.5, "stream": True, "parallel_tool_calls": False, "user": "u",
     "max_output_tokens": 64, "previous_response_id": "resp_1", "reasoning": {"effort": "low"},
     "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}},
    {"model": MODEL, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}", "id": "fc_1"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Sunny.", "annotations": []}]},
     ],
     "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True},
               {"type": "web_search"}],
     "tool_choice": {"type": "function", "name": "get_weather"}},
    {"model": MODEL, "input": "x", "tool_choice": {"type": "file_search"}, "tools": [{"type": "file_search", "vector_store_ids": []}]},
]


@pytest.mark.parametrize("body", RESPONSES_VALID)
def test_responses_bodies_that_validate(body):
    validate_body(RESPONSES, body)


RESPONSES_REJECTIONS = [
    ({"input": "hi"}, "model", "missing_required_parameter"),
    ({"model": MODEL, "input": 5}, "input", "invalid_value"),
    ({"model": MODEL, "input": [{"role": "robot", "content": "x"}]}, "input[0].role", "invalid_value"),
    ({"model": MODEL, "input": [{"type": "computer_call_output"}]}, "input[0].type", "invalid_value"),
    ({"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments",
     "missing_required_parameter"),
    ({"model": MODEL, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id",
     "missing_required_parameter"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "function"}]}, "tools[0].name", "missing_required_parameter"),
    ({"model": MODEL, "input": "x", "tools": [{"name": "f"}]}, "tools[0].type", "missing_required_parameter"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type", "invalid_value"),
    ({"model": MODEL, "input": "x", "temperature": "hot"}, "temperature", "invalid_value"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"model": MODEL, "input": "x", "store": "yes"}, "store", "invalid_value"),
    ({"model": MODEL, "input": "x", "metadata": {"k": 1}}, "metadata.k", "invalid_value"),
    ({"model": MODEL, "input": "x", "tool_choice": "maybe"}, "tool_choice", "invalid_value"),
    ({"model": MODEL, "input": "x", "previous_response_id": 3}, "previous_response_id", "invalid_value"),
]


@pytest.mark.parametrize(("body", "param", "code"), RESPONSES_REJECTIONS)
async def test_responses_rejections(gw, mock, body, param, code):
    status, reply = await post(gw.v1 + "/responses", body)
    assert status == 400, reply
    assert (reply["error"]["param"], reply["error"]["code"], reply["error"]["type"]) == (param, code, "invalid_request_error")
    assert mock.requests == []


async def test_validation_changes_neither_body_nor_raw(gw):
    """The unit only reads: the forwarded bytes are the client's bytes."""
    raw = b'{ "model" : "sovereign-alpha", "messages":[{"role":"user","content":"hi"}], "x-new": [1,2] }'
    body = orjson.loads(raw)
    before = copy.deepcopy(body)
    call = Call(CHAT, body, raw, CIMultiDictProxy(CIMultiDict()), "req_test")
    seen: list[tuple[Any, Any]] = []

    async def terminal(c: Call) -> Reply:
        seen.append((c.body, c.raw))
        return Reply.from_json({})

    unit = gw.gateway.unit("validation")
    assert isinstance(unit, ValidationUnit)
    await unit(call, terminal)
    assert seen[0][0] is body and body == before
    assert seen[0][1] is raw


def test_invalid_body_raises_api_error_without_input_echo():
    huge = "x" * 1_000_000
    with pytest.raises(ApiError) as info:
        validate_body(CHAT, chat(tool_choice=huge))
    assert info.value.param == "tool_choice"
    assert len(info.value.message) < 200


# --------------------------------------------------------------- route-level checks


async def test_invalid_json_non_object_and_content_type(gw, mock):
    url = gw.v1 + "/chat/completions"
    status, reply = await post(url, data=b'{"model": "sovereign-alpha", "messages": [')
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    status, reply = await post(url, data=b"\xff\xfe{}")
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    status, reply = await post(url, data=b"")
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    for value in (b"[1, 2]", b'"text"', b"42", b"null"):
        status, reply = await post(url, data=value)
        assert status == 400, value
        assert reply["error"]["message"] == "The request body must be a JSON object."
    status, reply = await post(url, data=orjson.dumps(chat()), headers={"Content-Type": "text/plain"})
    assert status == 400 and reply["error"]["code"] == "invalid_content_type"
    status, reply = await post(gw.v1 + "/responses", data=b"model=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and set(reply["error"]) == {"message", "type", "param", "code"}
    assert mock.requests == []


@pytest.fixture
async def small_gw(mock, gateway_factory):
    return await gateway_factory(make_settings(mock.url, pipeline=PIPELINE, server={"max_body_bytes": 64 * 1024}))


async def test_content_length_over_limit_is_413_unread(small_gw, mock):
    """A declared oversize body is refused from the headers alone (no body sent at all)."""
    host, port = small_gw.server.host, small_gw.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 104857600\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413")
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1])
        body = orjson.loads(await reader.readexactly(length))
        assert body["error"]["code"] == "request_too_large"
    finally:
        writer.close()
    assert mock.requests == []


async def test_chunked_body_over_limit_is_413_before_read_whole(small_gw, mock):
    """10 MB chunked without Content-Length: 413 arrives long before the upload could finish."""
    host, port = small_gw.server.host, small_gw.server.port
    reader, writer = await asyncio.open_connection(host, port)
    total, sent, chunk = 10 * 1024 * 1024, 0, b"a" * 16384
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    response = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b'5\r\n{"a":\r\n'
        )
        while sent < total and not response.done():
            writer.write(frame)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 1)
            except (ConnectionError, TimeoutError):
                break  # the server stopped reading: exactly the point
            await asyncio.sleep(0)
        head = await asyncio.wait_for(response, 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    # The limit is 64 KiB; kernel buffers may absorb some more, never the 10 MB.
    assert sent < 2 * 1024 * 1024, f"{sent} bytes went through before the gateway answered"
    assert mock.requests == []
