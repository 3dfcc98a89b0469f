"""Streams through the gateway: byte-exact relay, pacing, disconnects, mid-stream failures."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import orjson
import pytest

CHAT = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "stream me"}], "stream": True}
_VOLATILE = re.compile(rb'"id":"chatcmpl-mock-\d+"|"created":\d+')


def normalise(body: bytes) -> bytes:
    """Blank out the two fields the simulated provider varies per request."""
    return _VOLATILE.sub(b"<volatile>", body)


async def post_raw(url: str, body: dict, headers: dict | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers=headers or {}) as resp:
            return resp.status, await resp.read()


async def test_stream_is_byte_identical_to_the_providers(mock, passthrough):
    body = {**CHAT, "stream_options": {"include_usage": True}}
    # The same request as the provider receives it: under its own model name.
    direct_status, direct = await post_raw(mock.url + "/chat/completions", {**body, "model": "mock-model"})
    via_status, via = await post_raw(passthrough.v1 + "/chat/completions", body)
    assert direct_status == via_status == 200
    assert via.endswith(b"data: [DONE]\n\n")
    assert normalise(via) == normalise(direct)


async def test_json_body_is_relayed_unchanged(mock, passthrough):
    body = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hello"}]}
    _, direct = await post_raw(mock.url + "/chat/completions", {**body, "model": "mock-model"})
    status, via = await post_raw(passthrough.v1 + "/chat/completions", body)
    assert status == 200
    assert normalise(via) == normalise(direct)


async def test_paced_chunks_arrive_paced_not_in_a_burst(mock, passthrough):
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(
            passthrough.v1 + "/chat/completions", json=CHAT, headers={"x-mock-delay-ms": "120", "x-mock-chunks": "5"}
        ) as resp:
            async for _ in resp.content.iter_any():
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # 5 content chunks + final chunk, each 120 ms apart at the provider: most
    # reads must be separated by roughly that gap, not all arrive at the end.
    paced = [gap for gap in gaps if gap >= 0.09]
    assert len(paced) >= 5, gaps


async def test_client_disconnect_closes_the_provider_connection(mock, passthrough):
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            passthrough.v1 + "/chat/completions", json=CHAT, headers={"x-mock-delay-ms": "100", "x-mock-chunks": "50"}
        )
        await resp.content.readuntil(b"\n\n")
        resp.close()  # drop the connection mid-stream
    for _ in range(50):
        if mock.stats["client_disconnects"] >= 1:
            break
        await asyncio.sleep(0.05)
    assert mock.stats["client_disconnects"] == 1
    assert mock.stats["streams_completed"] == 0


async def test_provider_cut_mid_stream_ends_with_one_error_event(mock, passthrough):
    status, body = await post_raw(passthrough.v1 + "/chat/completions", CHAT, {"x-mock-cut-after": "3"})
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_error"
    assert sum(b'"error"' in e for e in events) == 1
    assert b"[DONE]" not in body
    # The content that was produced before the cut still reached the client.
    assert len(events) >= 4


async def test_sdk_stream_raises_on_mid_stream_failure(passthrough):
    client = passthrough.openai()
    import openai

    stream = await client.chat.completions.create(
        model="sovereign-alpha", messages=[{"role": "user", "content": "x"}], stream=True,
        extra_headers={"x-mock-cut-after": "2"},
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


class _GoneWriter:
    """A payload writer whose client vanished before the headers could be sent."""

    buffer_size = 0
    output_size = 0

    async def write_headers(self, status_line, headers):
        raise ConnectionResetError("client went away")

    def enable_chunking(self):
        pass

    def enable_compression(self, *args, **kwargs):
        pass


async def test_stream_dropped_before_its_first_event_closes_the_provider_response():
    from aiohttp.test_utils import make_mocked_request

    from proxy.core.call import Call, Reply, SSEEvent
    from proxy.web.middlewares import STREAM_OUTCOME
    from proxy.web.relay import send_stream

    from proxy.core.streams import EventStream

    closed = []

    async def provider_events():
        yield SSEEvent(b"data: {}\n\n")

    async def translate(events):  # a unit's generator layer, never started
        async for event in events:
            yield event

    request = make_mocked_request("POST", "/v1/chat/completions", writer=_GoneWriter())
    async def release_slot(_completed):
        closed.append("slot")

    provider = EventStream(provider_events(), on_close=lambda _completed: closed.append("provider"))
    reply = Reply(events=EventStream(EventStream(provider, on_close=release_slot), transform=translate))
    call = Call("chat.completions", {}, b"{}", request.headers, "req_test")
    await send_stream(request, reply, call)
    assert sorted(closed) == ["provider", "slot"]  # every layer's cleanup ran, sync and async
    assert request[STREAM_OUTCOME] == "client_disconnected"


async def test_provider_response_is_returned_to_the_pool_after_a_full_stream(mock, passthrough):
    # Two streams in a row on the gateway's pool: the first finished cleanly, so
    # closing hooks did not tear its connection down and the provider saw one connection.
    for _ in range(2):
        status, body = await post_raw(passthrough.v1 + "/chat/completions", CHAT)
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert mock.stats["streams_completed"] == 2
    assert mock.stats["client_disconnects"] == 0
