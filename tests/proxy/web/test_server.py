"""The server process: graceful drain on SIGTERM, SSE keep-alives, metrics."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from tests.support import make_settings, provider, settings_data, spawn_gateway

BODY = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "drain me"}], "stream": True}


async def test_sigterm_finishes_open_streams_refuses_new_requests_and_exits_zero(mock, tmp_path):
    data = settings_data(mock.url, admin_token=None, server={"drain_seconds": 10})
    proc, base = await spawn_gateway(data, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            # A paced stream of 15 chunks, 100 ms apart: about 1.5 s.
            stream = await session.post(
                base + "/v1/chat/completions", json=BODY, headers={"x-mock-chunks": "15", "x-mock-delay-ms": "100"}
            )
            await stream.content.readuntil(b"\n\n")
            sent_at = time.monotonic()
            proc.signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with session.get(base + "/readyz") as ready:
                assert ready.status == 503 and "draining" in (await ready.json())["reasons"]
            async with session.post(base + "/v1/chat/completions", json={**BODY, "stream": False}) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "draining"
            rest = await stream.read()
            assert rest.endswith(b"data: [DONE]\n\n")  # the open stream completed
        code = await asyncio.to_thread(proc.wait, 10)
        assert code == 0
        assert time.monotonic() - sent_at < 10
    finally:
        proc.stop()


async def test_streams_still_open_when_the_drain_runs_out_end_with_the_draining_event(mock, tmp_path):
    """They used to be cut mid-transfer (aiohttp: "Not enough data to satisfy transfer length header")."""
    import json

    data = settings_data(mock.url, admin_token=None, server={"drain_seconds": 1})
    proc, base = await spawn_gateway(data, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            # 100 chunks 100 ms apart: about 10 s, far past the 1 s drain.
            stream = await session.post(
                base + "/v1/chat/completions", json=BODY, headers={"x-mock-chunks": "100", "x-mock-delay-ms": "100"}
            )
            await stream.content.readuntil(b"\n\n")
            proc.signal(signal.SIGTERM)
            rest = await stream.read()  # a complete body: no ClientPayloadError
        events = [block for block in rest.decode().split("\n\n") if block]
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "draining" and len(events) < 100
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        proc.stop()


async def test_sse_keepalive_comments_while_the_provider_is_silent(mock, gateway_factory):
    gw = await gateway_factory(make_settings(mock.url, admin_token=None, server={"sse_keepalive_seconds": 0.2}))
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json=BODY, headers={"x-mock-first-byte-delay-ms": "0"}) as resp:
            plain = await resp.read()
        assert b": keep-alive" not in plain
        # The provider sends headers, then nothing for 0.7 s before the first chunk.
        async with session.post(
            gw.v1 + "/chat/completions", json=BODY, headers={"x-mock-delay-ms": "700", "x-mock-chunks": "2"}
        ) as resp:
            body = await resp.read()
    assert body.startswith(b"data: ") and body.endswith(b"data: [DONE]\n\n")
    # Comments only, and only between events: removing them gives a valid stream.
    assert all(line in (b"", b": keep-alive") or line.startswith(b"data: ") for line in body.split(b"\n"))


async def test_metrics_count_what_happened(mock, passthrough):
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(passthrough.v1 + "/chat/completions", json={**BODY, "stream": False}) as resp:
                assert resp.status == 200
        async with session.post(passthrough.v1 + "/chat/completions", json=BODY) as resp:
            await resp.read()
        async with session.post(
            passthrough.v1 + "/chat/completions", json={**BODY, "stream": False}, headers={"x-mock-fail-status": "500"}
        ) as resp:
            assert resp.status == 502
        await asyncio.sleep(0.1)  # the access logger runs after the response
        async with session.get(passthrough.base_url + "/metrics") as resp:
            text = await resp.text()
    assert 'sovereign_requests_total{model="sovereign-alpha",route="/v1/chat/completions",status="200"} 4.0' in text
    assert 'sovereign_requests_total{model="sovereign-alpha",route="/v1/chat/completions",status="502"} 1.0' in text
    assert 'sovereign_upstream_errors_total{upstream="default"} 1.0' in text
    assert 'sovereign_time_to_first_byte_seconds_count{route="chat.completions"} 4.0' in text
    assert 'sovereign_upstream_latency_seconds_count{upstream="default"} 4.0' in text
    assert "sovereign_open_streams 0.0" in text


async def test_tenant_labels_only_behind_the_switch(mock, gateway_factory, redis_prefix):
    from proxy.store.accounts import Accounts
    from tests.support import REDIS_URL

    texts = {}
    for switch in (False, True):
        settings = make_settings(
            mock.url, store_url=REDIS_URL, prefix=f"{redis_prefix}-{int(switch)}", pipeline=["auth", "metering"],
            admin_token=None, metrics={"tenant_labels": switch},
        )
        gw = await gateway_factory(settings)
        accounts = Accounts(gw.gateway.store)
        await accounts.create_tenant("acme", 10_000)
        key, _ = await accounts.create_key("acme")
        await gw.openai(key).chat.completions.create(model="sovereign-alpha", messages=[{"role": "user", "content": "hi"}])
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.base_url + "/metrics") as resp:
                texts[switch] = await resp.text()
    assert 'tenant="acme"' not in texts[False]
    assert 'sovereign_requests_total{model="sovereign-alpha",route="/v1/chat/completions",status="200",tenant="acme"} 1.0' in texts[True]
    # Metering's own figures are there in both cases.
    assert 'sovereign_credits_charged_total{model="sovereign-alpha",source="reported"}' in texts[False]
    await cleanup_prefixes(redis_prefix)


async def cleanup_prefixes(prefix: str) -> None:
    from tests.support import cleanup_redis_prefix

    for suffix in ("-0", "-1"):
        await cleanup_redis_prefix(prefix + suffix)


async def test_keepalive_client_leaving_before_the_first_event_releases_its_hold(gateway_factory, redis_prefix):
    """A provider silent after its headers, keep-alive comments on, the client leaves: nothing stays held."""
    from aiohttp import web

    from proxy.store.accounts import Accounts
    from tests.support import REDIS_URL

    async def silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(3)
        await response.write(b"data: [DONE]\n\n")
        return response

    async with provider(silent) as url:
        gw = await gateway_factory(make_settings(
            url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"],
            admin_token=None, server={"sse_keepalive_seconds": 0.2},
        ))
        accounts = Accounts(gw.gateway.store)
        await accounts.create_tenant("acme", 100_000)
        key, _ = await accounts.create_key("acme")
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                gw.v1 + "/chat/completions", json={**BODY, "max_tokens": 100},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert await response.content.readuntil(b"\n\n") == b": keep-alive\n\n"
            response.close()  # gone before the provider said anything
        for _ in range(40):
            await asyncio.sleep(0.05)
            if (await accounts.tenant("acme"))["reserved"] == 0:
                break
        view = await accounts.tenant("acme")
        assert view["reserved"] == 0 and view["balance"] == 100_000


async def test_arbitrary_model_names_do_not_become_metric_labels(passthrough):
    async with aiohttp.ClientSession() as session:
        for i in range(20):
            body = {"model": f"made-up-model-{i}-" + "x" * 100, "messages": [{"role": "user", "content": "x"}]}
            async with session.post(passthrough.v1 + "/chat/completions", json=body) as resp:
                assert resp.status == 404
        await asyncio.sleep(0.1)
        async with session.get(passthrough.base_url + "/metrics") as resp:
            text = await resp.text()
    assert "made-up-model" not in text
    assert 'sovereign_requests_total{model="other",route="/v1/chat/completions",status="404"} 20.0' in text
