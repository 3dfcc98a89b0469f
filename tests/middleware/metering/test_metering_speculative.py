"""Speculative holds: the hold and the provider request go out together, yet nothing is served unheld.

Real Redis throughout (the shared one under a test prefix, or a private
redis-server that the test pauses or stops) and a provider of the test's own
that records when a request arrives and when the gateway abandons it.
"""

from __future__ import annotations

import asyncio

import openai
import orjson
import pytest
from aiohttp import web

from middleware.metering.unit import HOLD_RESERVE
from proxy.store.accounts import Accounts
from tests.middleware.metering.test_metering import MESSAGES, PIPELINE, new_tenant
from tests.support import REDIS_URL, make_settings, provider, until

# Input is free and each request costs exactly 2 × max_tokens + 1, so balances are exact.
PRICED = {"sovereign-alpha": {"upstream": "default", "price": {"input_per_million": 0, "output_per_million": 2_000_000, "per_request": 1}}}


class RecordingProvider:
    """Answers chat completions after `delay` seconds; records arrivals and abandoned requests."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.arrived: list[dict] = []
        self.abandoned = 0
        self.arrival = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.arrived.append(body)
        self.arrival.set()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.abandoned += 1  # the gateway closed the connection
            raise
        tokens = body.get("max_completion_tokens") or 1
        usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens}
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": "x" * tokens}, "finish_reason": "stop"}]}
            await response.write(b"data: " + orjson.dumps({**chunk, "usage": None}) + b"\n\n")
            await response.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * tokens}, "finish_reason": "stop"}],
        })


async def metered(gateway_factory, url: str, store_url: str, prefix: str | None, pipeline=PIPELINE, **metering):
    settings = make_settings(url, store_url=store_url, prefix=prefix, pipeline=pipeline, units={"metering": metering},
                             admin_token=None, models=PRICED, store={"timeout": 0.5})
    running = await gateway_factory(settings)
    return running, Accounts(running.gateway.store)


def ask(client: openai.AsyncOpenAI, max_tokens: int = 2, **kwargs):
    return client.chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=max_tokens, **kwargs)


@pytest.mark.parametrize(
    ("pipeline", "setting", "speculative"),
    [(PIPELINE, True, True), (PIPELINE, False, False), ([*PIPELINE, "sessions"], True, False)],
    ids=["speculative", "switched-off", "metering-not-last"],
)
async def test_the_provider_gets_the_request_while_the_hold_is_still_under_way(
    gateway_factory, own_redis, pipeline, setting, speculative
):
    """Redis paused mid-request: a speculative request is already at the provider, a plain one is not.

    A unit after metering (sessions here) would act on the request before its
    hold is confirmed, so metering only speculates as the last unit.
    """
    recorder = RecordingProvider()
    async with provider(recorder.handle) as url:
        running, accounts = await metered(gateway_factory, url, own_redis.url, None, pipeline, speculative_hold=setting)
        tenant, key = await new_tenant(accounts, 1_000_000)
        client = running.openai(key)
        await ask(client)  # the first hold tells the gateway how much room the tenant has
        recorder.arrival.clear()
        await asyncio.to_thread(own_redis.pause)
        try:
            pending = asyncio.ensure_future(ask(client))
            if speculative:
                await asyncio.wait_for(recorder.arrival.wait(), 0.3)
            else:
                await asyncio.sleep(0.2)
                assert not recorder.arrival.is_set() and len(recorder.arrived) == 1
            assert not pending.done()  # nothing is served before the hold is confirmed
        finally:
            await asyncio.to_thread(own_redis.resume)
        reply = await pending
        assert reply.choices[0].message.content == "xx"
        await running.gateway.drain()
        view = await accounts.tenant(tenant)
        assert (view["balance"], view["reserved"]) == (1_000_000 - 2 * 5, 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_refused_speculative_hold_cancels_the_provider_request_and_serves_nothing(
    gateway_factory, redis_prefix, stream
):
    recorder = RecordingProvider(delay=2.0)
    async with provider(recorder.handle) as url:
        running, accounts = await metered(gateway_factory, url, REDIS_URL, redis_prefix)
        tenant, key = await new_tenant(accounts, 1_000)
        client = running.openai(key)
        recorder.delay = 0.0
        await ask(client)  # 5 credits: the gateway now believes in 995 of room
        recorder.delay = 2.0
        # Another replica takes almost everything meanwhile (a hold of its own).
        store = running.gateway.store
        keys = [store.tenant_key(tenant, part) for part in ("tenant", "holds", "hold_amounts")]
        status, _ = await store.run(HOLD_RESERVE, keys, ["other-replica", 990, 0, 2**50])
        assert status == 1
        started = asyncio.get_running_loop().time()
        with pytest.raises(openai.APIStatusError) as info:
            await ask(client, max_tokens=10, stream=stream)  # 21 credits: speculative, and refused
        assert info.value.status_code == 402 and info.value.code == "insufficient_credits"
        assert asyncio.get_running_loop().time() - started < 1.0  # not after the provider's 2 s
        assert len(recorder.arrived) == 2  # it did reach the provider ...
        for _ in range(50):
            if recorder.abandoned:
                break
            await asyncio.sleep(0.02)
        assert recorder.abandoned == 1  # ... which saw it cancelled at once
        await running.gateway.drain()
        view = await accounts.tenant(tenant)
        assert (view["balance"], view["reserved"]) == (995, 990)  # only the other replica's hold
        charges = [e for e in await accounts.ledger(tenant) if e["type"] == "charge"]
        assert len(charges) == 1


async def test_a_store_failure_during_a_speculative_hold_is_a_503_and_ends_speculation(gateway_factory, own_redis):
    recorder = RecordingProvider()
    async with provider(recorder.handle) as url:
        running, accounts = await metered(gateway_factory, url, own_redis.url, None)
        _, key = await new_tenant(accounts, 1_000_000)
        client = running.openai(key)
        await ask(client)
        await asyncio.to_thread(own_redis.stop)
        try:
            arrived = []
            for _ in range(2):
                with pytest.raises(openai.APIStatusError) as info:
                    await ask(client)
                assert info.value.status_code == 503 and info.value.code == "store_unavailable"
                arrived.append(len(recorder.arrived))
            # After the first failure the gateway no longer trusts what it knew of
            # the tenant: the second request waits for its hold and never leaves.
            assert arrived[1] == arrived[0] <= 2
        finally:
            await asyncio.to_thread(own_redis.start)
        await running.gateway.drain()
        # The releases of the failed holds were kept and land on the restarted Redis.
        metering = running.gateway.unit("metering")
        await until(lambda: metering.settlements.count == 0, timeout=10)


async def test_no_overspend_and_no_wasted_provider_call_when_a_burst_meets_a_small_balance(gateway_factory, redis_prefix):
    """300 concurrent requests after a warm-up, against a balance for 15: exactly 15 served, none refused at the provider."""
    n, max_tokens = 15, 4
    cost = 2 * max_tokens + 1
    recorder = RecordingProvider()
    async with provider(recorder.handle) as url:
        running, accounts = await metered(gateway_factory, url, REDIS_URL, redis_prefix)
        tenant, key = await new_tenant(accounts, n * cost)
        client = running.openai(key)
        await ask(client, max_tokens)  # warm-up: room for 14 more is known, so the burst starts speculating
        results = await asyncio.gather(*(ask(client, max_tokens) for _ in range(300)), return_exceptions=True)
        served = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, openai.APIStatusError) and r.status_code == 402]
        others = {repr(r)[:300] for r in results if isinstance(r, Exception) and r not in refused}
        assert len(served) == n - 1 and len(served) + len(refused) == 300, others
        # Speculation stopped at the margin: every request that reached the provider was held.
        assert len(recorder.arrived) == n and recorder.abandoned == 0
        await running.gateway.drain()
        view = await accounts.tenant(tenant)
        ledger = await accounts.ledger(tenant, limit=1000)
        assert (view["balance"], view["reserved"]) == (0, 0)
        assert sum(e["credits"] for e in ledger) == 0 and len([e for e in ledger if e["type"] == "charge"]) == n


async def test_a_client_gone_as_the_forward_finishes_still_closes_the_provider_stream(gateway_factory, redis_prefix, monkeypatch):
    """The handler is cancelled in the very loop iteration the speculative forward returns its stream reply.

    Fault injection: the forward task's completion cancels the request's task
    at once, as aiohttp does when the client's connection drops. The reply must
    not be dropped with its provider connection left open.
    """
    import types

    import middleware.metering.unit as metering

    closed = asyncio.Event()
    hang = False

    async def streaming(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
        if hang:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                closed.set()  # the gateway closed the connection
                raise
        await response.write(b"data: [DONE]\n\n")
        return response

    real = asyncio.ensure_future
    armed = False

    def ensure_future(coro):
        task = real(coro)
        if armed:
            handler = asyncio.current_task()
            task.add_done_callback(lambda _: handler.cancel())
        return task

    patched = types.SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio) if not name.startswith("__")})
    patched.ensure_future = ensure_future
    monkeypatch.setattr(metering, "asyncio", patched)
    async with provider(streaming) as url:
        running, accounts = await metered(gateway_factory, url, REDIS_URL, redis_prefix)
        tenant, key = await new_tenant(accounts, 1_000_000)
        client = running.openai(key)
        async for _ in await ask(client, stream=True):  # not speculative: it teaches the gateway the room
            pass
        armed = hang = True
        with pytest.raises(openai.APIConnectionError):
            async for _ in await ask(client, stream=True):
                pass
        await asyncio.wait_for(closed.wait(), 2)  # at once, not after the provider's idle or total timeout
        pool = running.gateway.router.upstreams["default"].pool
        for _ in range(100):
            if pool._open == 0:
                break
            await asyncio.sleep(0.01)
        assert pool._open == 0
        await running.gateway.drain()
        assert (await accounts.tenant(tenant))["reserved"] == 0
