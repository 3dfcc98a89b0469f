"""Forwarding to providers: failures, timeouts, header hygiene, key secrecy, failover."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import aiohttp.web
import openai
import pytest

from proxy.devtools.mock_upstream import MockOptions, MockUpstream
from tests.support import free_port, make_settings, provider

UPSTREAM_KEY = "sk-upstream-secret-test-key-0123456789"
BODY = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hello"}]}


async def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/chat/completions", json=body, headers=headers or {}) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
async def one_attempt(mock, gateway_factory):
    """A gateway that does not retry, so each failure is seen once."""
    return await gateway_factory(
        make_settings(mock.url, admin_token=None, routing={"attempts": 1},
                      upstreams={"default": {"timeouts": {"first_byte": 0.5, "idle": 0.5}}})
    )


async def test_provider_500_becomes_502_upstream_error(one_attempt):
    client = one_attempt.openai()
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(**BODY, extra_headers={"x-mock-fail-status": "500"})
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"
    assert info.value.type == "server_error"


async def test_provider_timeout_becomes_504(one_attempt):
    status, _, body = await post(one_attempt.v1, BODY, {"x-mock-first-byte-delay-ms": "1500"})
    assert status == 504
    assert b'"code":"upstream_timeout"' in body


async def test_provider_going_silent_mid_stream_ends_with_timeout_event(one_attempt):
    # The idle timeout (0.5 s) is shorter than the provider's gap between chunks.
    status, _, body = await post(
        one_attempt.v1, {**BODY, "stream": True}, {"x-mock-delay-ms": "1200", "x-mock-chunks": "3"}
    )
    assert status == 200
    assert body.rstrip().endswith(b'"code":"upstream_timeout"}}')


async def test_provider_client_error_is_relayed_with_its_status(passthrough):
    status, _, body = await post(passthrough.v1, {"model": "sovereign-alpha", "messages": "not a list"})
    assert status == 400
    assert b'"invalid_request_error"' in body


async def test_provider_refusing_the_gateway_key_is_a_502_that_names_no_key(mock, gateway_factory):
    mock.options.api_key = "a-different-key"
    gw = await gateway_factory(make_settings(mock.url, admin_token=None))
    status, headers, body = await post(gw.v1, BODY)
    assert status == 502
    assert b"upstream_error" in body
    assert UPSTREAM_KEY.encode() not in body and b"Bearer" not in body


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_key_echoed_by_the_provider_never_reaches_the_client(passthrough, stream):
    status, headers, body = await post(passthrough.v1, {**BODY, "stream": stream}, {"x-mock-echo-auth": "1"})
    assert status == 200
    assert UPSTREAM_KEY.encode() not in body
    assert b"[redacted]" in body
    assert all(UPSTREAM_KEY not in value for value in headers.values())


async def test_echoed_key_in_a_provider_error_is_redacted(passthrough):
    status, _, body = await post(passthrough.v1, BODY, {"x-mock-echo-auth": "1", "x-mock-fail-status": "422"})
    assert status == 422
    assert UPSTREAM_KEY.encode() not in body


async def test_headers_crossing_the_gateway(mock, passthrough):
    status, headers, _ = await post(
        passthrough.v1,
        BODY,
        {
            "Authorization": "Bearer sk-sov-live-client-key-should-not-travel",
            "X-Request-ID": "trace-123",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "hop-value",
            "Proxy-Authorization": "Basic abc",
            "Cookie": "session=1",
            "X-Custom": "kept",
        },
    )
    assert status == 200
    seen = mock.requests[-1]["headers"]
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen["x-request-id"] == "trace-123"
    assert seen["x-custom"] == "kept"
    for dropped in ("x-hop", "proxy-authorization", "cookie", "x-session-id"):
        assert dropped not in seen
    assert mock.requests[-1]["body"]["model"] == "mock-model"
    assert headers["X-Request-ID"] == "trace-123"
    assert "Transfer-Encoding" not in headers or headers["Transfer-Encoding"] == "chunked"


async def test_request_id_is_generated_when_absent_or_unsafe(mock, passthrough):
    _, headers, _ = await post(passthrough.v1, BODY, {"X-Request-ID": "bad id with spaces\u00e9"})
    generated = headers["X-Request-ID"]
    assert generated.startswith("req_") and mock.requests[-1]["headers"]["x-request-id"] == generated


async def test_a_provider_that_never_completes_the_connection_is_a_504(gateway_factory):
    """TCP accepted, TLS handshake never answered: the connect timeout is a timeout (504), not a 502."""
    async def silent(reader, writer):
        await reader.read()  # until the gateway gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await gateway_factory(make_settings(
            f"https://127.0.0.1:{port}/v1", admin_token=None, routing={"attempts": 1},
            upstreams={"default": {"timeouts": {"connect": 0.3}}},
        ))
        status, _, body = await post(gw.v1, BODY)
        assert status == 504 and b'"code":"upstream_timeout"' in body
    finally:
        server.close()


async def test_connection_refused_fails_over_to_the_next_target(mock, gateway_factory):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    settings = make_settings(
        mock.url,
        admin_token=None,
        upstreams={"dead": {"url": dead}, "default": {"url": mock.url}},
        models={"sovereign-alpha": {"upstream": ["dead", "default"]}},
    )
    gw = await gateway_factory(settings)
    reply = await gw.openai().chat.completions.create(**BODY)
    assert reply.choices[0].message.content
    assert len(mock.requests) == 1


async def test_breaker_skips_a_failing_target_until_its_cooldown(mock, gateway_factory):
    failing = MockUpstream(MockOptions(fail_status=503))
    failing_url = await failing.start()
    try:
        settings = make_settings(
            mock.url,
            admin_token=None,
            routing={"breaker_failures": 2, "breaker_cooldown": 0.6, "backoff_ms": 1},
            upstreams={"primary": {"url": failing_url}, "default": {"url": mock.url}},
            models={"sovereign-alpha": {"upstream": ["primary", "default"]}},
        )
        gw = await gateway_factory(settings)
        client = gw.openai()
        for _ in range(2):  # two failures open the primary's breaker
            await client.chat.completions.create(**BODY)
        assert len(failing.requests) == 2
        for _ in range(5):  # open: every request goes straight to the second target
            await client.chat.completions.create(**BODY)
        assert len(failing.requests) == 2
        assert len(mock.requests) == 7
        await asyncio.sleep(0.7)  # cool-down over: the primary gets one trial
        await client.chat.completions.create(**BODY)
        assert len(failing.requests) == 3
    finally:
        await failing.close()


async def test_nothing_is_retried_after_the_stream_started(mock, passthrough):
    status, _, body = await post(passthrough.v1, {**BODY, "stream": True}, {"x-mock-cut-after": "2"})
    assert status == 200 and b'"upstream_error"' in body
    assert len(mock.requests) == 1


async def test_a_short_retry_after_is_honoured_before_retrying(mock, gateway_factory):
    """A provider answering 429 with Retry-After: the gateway waits that long, then retries."""
    from aiohttp import web

    seen: list[float] = []

    async def limited(request: web.Request) -> web.Response:
        seen.append(asyncio.get_running_loop().time())
        if len(seen) == 1:
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0.4"})
        async with aiohttp.ClientSession() as session:  # then behave like the provider
            async with session.post(mock.url + "/chat/completions", data=await request.read(),
                                    headers={"Content-Type": "application/json"}) as resp:
                return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")

    async with provider(limited) as url:
        gw = await gateway_factory(make_settings(url, admin_token=None))
        reply = await gw.openai().chat.completions.create(**BODY)
        assert reply.choices[0].message.content
        assert len(seen) == 2
        assert seen[1] - seen[0] >= 0.38  # waited for Retry-After, not the 50 ms backoff


async def test_a_long_retry_after_is_not_waited_for(mock, gateway_factory):
    """Retry-After beyond routing.max_retry_after: no long sleep; the 429 reaches the client."""
    from aiohttp import web

    async def limited(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "30"})

    async with provider(limited) as url:
        gw = await gateway_factory(make_settings(url, admin_token=None, routing={"attempts": 2}))
        started = asyncio.get_running_loop().time()
        with pytest.raises(openai.RateLimitError) as info:
            await gw.openai().chat.completions.create(**BODY)
        assert asyncio.get_running_loop().time() - started < 2
        assert info.value.response.headers["Retry-After"] == "30"


async def test_a_provider_429_counts_as_an_upstream_error_not_a_gateway_rate_limit(gateway_factory):
    """The provider limiting the gateway's account is not one of this gateway's per-key limits."""
    from aiohttp import web

    async def limited(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "30"})

    async with provider(limited) as url:
        gw = await gateway_factory(make_settings(url, admin_token=None, routing={"attempts": 1}))
        with pytest.raises(openai.RateLimitError) as info:
            await gw.openai().chat.completions.create(**BODY)
        assert info.value.code == "rate_limit_exceeded"
        metrics = gw.gateway.metrics
        assert metrics.rate_limited._value.get() == 0
        assert metrics.upstream_errors.labels("default")._value.get() == 1


async def _broken_reply(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
    """No completion: `x-broken: cut` truncated JSON, `empty` nothing, `reset` a connection reset mid-body,
    `error` a 200 whose body is an error (OpenRouter), `garbled` one that is no JSON after all, `payment` a 402 (the operator's provider account is out of funds)."""
    await request.read()
    kind = request.headers.get("x-broken", "cut")
    if kind == "garbled":  # an error body that is no JSON after all
        return aiohttp.web.Response(body=b'{"error": Provider returned error}', content_type="application/json")
    if kind in ("error", "payment"):
        error = {"error": {"message": "Provider returned error", "code": 402}}
        return aiohttp.web.json_response(error, status=200 if kind == "error" else 402)
    if kind == "reset":
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "500"})
        await response.prepare(request)
        await response.write(b'{"id": "x", "choices": [')
        assert request.transport is not None
        request.transport.abort()
        return response
    body = b"" if kind == "empty" else b'{"id": "x", "choices": [{"message": {"content": "hi"'
    return aiohttp.web.Response(body=body, content_type="application/json")


@pytest.mark.parametrize("kind", ["cut", "empty", "reset", "error", "garbled", "payment"])
async def test_a_200_that_is_no_json_completion_fails_over_and_is_a_502_when_alone(mock, gateway_factory, kind):
    """Such a body used to reach the client as a 200 (uncharged, since it has no usage), with no failover.

    A provider's 402 used to reach the client as its own 402 (the Anthropic SDK's
    billing_error), though it is the operator's provider account that is out of funds.
    """
    async with provider(_broken_reply) as broken:
        alone = await gateway_factory(make_settings(broken, admin_token=None, routing={"attempts": 1}))
        with pytest.raises(openai.APIStatusError) as info:
            await alone.openai().chat.completions.create(**BODY, extra_headers={"x-broken": kind})
        assert info.value.status_code == 502 and info.value.code == "upstream_error"
        settings = make_settings(
            mock.url, admin_token=None,
            upstreams={"broken": {"url": broken}, "default": {"url": mock.url}},
            models={"sovereign-alpha": {"upstream": ["broken", "default"]}},
        )
        both = await gateway_factory(settings)
        reply = await both.openai().chat.completions.create(**BODY, extra_headers={"x-broken": kind})
    assert reply.choices[0].message.content and len(mock.requests) == 1


async def _stream_then_close(request: aiohttp.web.Request, choices: list[list[dict]], tail: bytes = b"") -> aiohttp.web.StreamResponse:
    """A provider's chat stream of one chunk per `choices` entry, then `tail`, then a clean close (no [DONE])."""
    await request.read()
    response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    for chunk_choices in choices:
        await response.write(b"data: " + json.dumps({**head, "choices": chunk_choices}).encode() + b"\n\n")
    await response.write(tail)
    await response.write_eof()
    return response


async def test_a_providers_error_event_is_the_streams_one_error(gateway_factory):
    """A provider that sends its own error event and closes: the client used to get a second error after it."""
    async def fails_in_band(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        return await _stream_then_close(request, [[{"index": 0, "delta": {"content": "w "}, "finish_reason": None}]],
                                        b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')

    async with provider(fails_in_band) as url:
        gw = await gateway_factory(make_settings(url, admin_token=None))
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.v1 + "/chat/completions", json={**BODY, "stream": True}) as resp:
                events = [block for block in (await resp.read()).decode().split("\n\n") if block]
    assert len(events) == 2 and json.loads(events[1].removeprefix("data: "))["error"]["message"] == "overloaded"


async def test_a_fractional_retry_after_is_rounded_up(gateway_factory):
    """`Retry-After: 0.1` used to reach the client as 0, which the SDKs ignore."""
    async def limited(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0.1"})

    async with provider(limited) as url:
        gw = await gateway_factory(make_settings(url, admin_token=None, routing={"attempts": 1}))
        status, headers, _ = await post(gw.v1, BODY)
    assert (status, headers["Retry-After"]) == (429, "1")


@pytest.mark.parametrize("chunks", [0, 2], ids=["empty", "cut_cleanly"])
async def test_a_chat_stream_that_closes_before_it_finished_ends_with_the_error_event(gateway_factory, chunks):
    """No [DONE] and no finish_reason, but a clean close: the client used to see a silent end (or nothing at all)."""
    async def gives_up(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        return await _stream_then_close(
            request, [[{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}] for i in range(chunks)])

    async with provider(gives_up) as url:
        gw = await gateway_factory(make_settings(url, admin_token=None))
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.v1 + "/chat/completions", json={**BODY, "stream": True}) as resp:
                assert resp.status == 200
                events = [block for block in (await resp.read()).decode().split("\n\n") if block]
    assert len(events) == chunks + 1
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_error" and "ended the stream early" in error["message"]


async def test_a_stream_of_two_choices_that_closes_with_one_unfinished_ends_with_the_error_event(gateway_factory):
    """n=2: choice 0 finished, choice 1 cut, no [DONE]: the client used to see a normal end."""
    async def half_done(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        return await _stream_then_close(request, [[{"index": 0, "delta": {"content": "a"}, "finish_reason": None},
                                                   {"index": 1, "delta": {"content": "b"}, "finish_reason": None}],
                                                  [{"index": 0, "delta": {}, "finish_reason": "stop"}]])

    async with provider(half_done) as url:
        gw = await gateway_factory(make_settings(url, admin_token=None))
        stream = await gw.openai().chat.completions.create(**BODY, n=2, stream=True)
        seen = []
        with pytest.raises(openai.APIError, match="ended the stream early"):
            async for chunk in stream:
                seen.append(chunk)
    assert len(seen) == 2
