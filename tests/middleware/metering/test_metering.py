"""Credit metering end to end: holds, charges, the ledger, streams, overspend (real Redis)."""

from __future__ import annotations

import asyncio
import math
import re
import uuid

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.store.accounts import Accounts
from tests.support import REDIS_URL, make_settings, provider, settings_data

PIPELINE = ["auth", "metering"]


def prompt_tokens(messages: list[dict]) -> int:
    """What the simulated provider reports as prompt tokens."""
    return max(1, sum(len(orjson.dumps(m.get("content"))) // 4 + 4 for m in messages))


async def metered(gateway_factory, mock, redis_prefix, metering=None, models=None):
    overrides = {"models": models} if models else {}
    settings = make_settings(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=PIPELINE,
        units={"metering": metering or {}}, admin_token=None, **overrides,
    )
    running = await gateway_factory(settings)
    return running, Accounts(running.gateway.store)


async def new_tenant(accounts: Accounts, credits: int) -> tuple[str, str]:
    tenant = "t-" + uuid.uuid4().hex[:10]
    await accounts.create_tenant(tenant, credits)
    key, _ = await accounts.create_key(tenant)
    return tenant, key


async def assert_ledger_matches(accounts: Accounts, tenant: str) -> dict:
    view = await accounts.tenant(tenant)
    ledger = await accounts.ledger(tenant, limit=10_000)
    assert sum(e["credits"] for e in ledger) == view["balance"]
    assert ledger[0]["balance_after"] == view["balance"]
    return view


MESSAGES = [{"role": "user", "content": "hello world"}]


async def test_json_request_is_charged_from_reported_usage(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 1000)
    client = running.openai(key)
    reply = await client.chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=5)
    assert reply.usage.completion_tokens == 5
    await running.gateway.drain()  # JSON replies settle in the background
    cost = prompt_tokens(MESSAGES) * 1 + 5 * 2
    view = await assert_ledger_matches(accounts, tenant)
    assert view["balance"] == 1000 - cost and view["reserved"] == 0
    entry = (await accounts.ledger(tenant))[0]
    key_record = (await accounts.list_keys(tenant))[0]
    assert entry["type"] == "charge" and entry["credits"] == -cost
    assert entry["id"] == f"req:{entry['request_id']}"
    assert entry["model"] == "sovereign-alpha" and entry["key_id"] == key_record.id
    assert entry["input_tokens"] == prompt_tokens(MESSAGES) and entry["output_tokens"] == 5
    assert entry["usage_source"] == "reported" and entry["kind"] == "request"
    sent = mock.requests[-1]["body"]
    # The client's cap travels in the field the model's provider reads, and only there.
    assert sent["max_completion_tokens"] == 5 and "max_tokens" not in sent
    metrics = running.gateway.metrics
    assert metrics.holds_open._value.get() == 0
    assert metrics.credits.labels("sovereign-alpha", "reported")._value.get() == cost
    assert metrics.tokens.labels("output", "sovereign-alpha")._value.get() == 5


async def test_anonymous_tenant_is_metered_without_auth(mock, gateway_factory, redis_prefix, store_url):
    settings = make_settings(mock.url, store_url=store_url, prefix=redis_prefix, pipeline=["metering"], admin_token=None)
    running = await gateway_factory(settings)
    client = running.openai()
    with pytest.raises(openai.APIStatusError) as exc:  # no "anonymous" tenant yet: nothing to spend
        await client.chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=2)
    assert exc.value.status_code == 402
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("anonymous", 100)
    stream = await client.chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=2, stream=True)
    assert len([chunk async for chunk in stream]) == 4  # role, 2 content, finish: no usage chunk
    await running.gateway.drain()
    view = await assert_ledger_matches(accounts, "anonymous")
    assert (view["balance"], view["reserved"]) == (100 - prompt_tokens(MESSAGES) - 4, 0)


async def test_missing_cap_is_set_from_the_model_and_sizes_the_hold(mock, gateway_factory, redis_prefix):
    models = {
        "sovereign-alpha": {"upstream": "default", "max_output_tokens": 6, "output_cap_param": "max_tokens",
                            "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}},
    }
    running, accounts = await metered(gateway_factory, mock, redis_prefix, models=models)
    tenant, key = await new_tenant(accounts, 1000)
    reply = await running.openai(key).chat.completions.create(model="sovereign-alpha", messages=MESSAGES)
    assert mock.requests[-1]["body"]["max_tokens"] == 6
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6


async def test_insufficient_credits_is_402_with_the_numbers(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 50)
    with pytest.raises(openai.APIStatusError) as exc:
        await running.openai(key).chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=100)
    error = exc.value
    assert error.status_code == 402
    assert error.response.headers["x-should-retry"] == "false"
    body = error.response.json()["error"]
    assert body["code"] == "insufficient_credits" and body["type"] == "invalid_request_error"
    assert "50 are available" in body["message"] and "needs" in body["message"]
    assert mock.stats["requests"] == 0
    assert (await accounts.tenant(tenant))["reserved"] == 0


async def test_clamp_lowers_the_output_cap_to_the_balance(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix, {"on_low_balance": "clamp"})
    tenant, key = await new_tenant(accounts, 60)
    reply = await running.openai(key).chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=1000)
    sent = mock.requests[-1]["body"]["max_completion_tokens"]
    assert "max_tokens" not in mock.requests[-1]["body"]
    assert 1 <= sent < 30  # 2 credits per output token, the prompt estimate takes the rest
    assert reply.usage.completion_tokens <= sent
    await running.gateway.drain()
    view = await assert_ledger_matches(accounts, tenant)
    assert view["balance"] >= 0 and view["reserved"] == 0
    # Nothing left that affords a single output token: 402.
    poor, poor_key = await new_tenant(accounts, 3)
    with pytest.raises(openai.APIStatusError) as exc:
        await running.openai(poor_key).chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=1000)
    assert exc.value.status_code == 402


async def test_stream_without_include_usage_is_what_the_provider_would_send(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 1000)
    request = {"model": "sovereign-alpha", "messages": MESSAGES, "max_tokens": 6, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(running.v1 + "/chat/completions", json=request, headers={"Authorization": f"Bearer {key}"}) as resp:
            via_gateway = await resp.read()
        forwarded = mock.requests[-1]["body"]
        assert forwarded["stream_options"] == {"include_usage": True}
        direct_body = {k: v for k, v in forwarded.items() if k != "stream_options"}
        async with http.post(mock.url + "/chat/completions", json=direct_body) as resp:
            direct = await resp.read()

    def payloads(raw: bytes) -> list:
        out = []
        for block in raw.split(b"\n\n"):
            if not block.strip():
                continue
            data = block.removeprefix(b"data: ")
            obj = orjson.loads(data) if data != b"[DONE]" else "[DONE]"
            if isinstance(obj, dict):
                obj.pop("id"), obj.pop("created")
            out.append(obj)
        return out

    assert payloads(via_gateway) == payloads(direct)
    assert b'"usage"' not in via_gateway
    await running.gateway.drain()
    view = await assert_ledger_matches(accounts, tenant)
    cost = prompt_tokens(MESSAGES) + 2 * 6
    assert view["balance"] == 1000 - cost and view["reserved"] == 0
    entry = (await accounts.ledger(tenant))[0]
    assert entry["usage_source"] == "reported" and entry["output_tokens"] == 6


async def test_stream_with_include_usage_passes_the_usage_chunk(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 1000)
    stream = await running.openai(key).chat.completions.create(
        model="sovereign-alpha", messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 4
    await running.gateway.drain()
    view = await assert_ledger_matches(accounts, tenant)
    assert view["balance"] == 1000 - (usage[0].prompt_tokens + 8)


async def test_stream_the_client_asked_usage_for_is_relayed_byte_for_byte(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 1000)
    body = {"model": "sovereign-alpha", "messages": MESSAGES, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as http:
        async with http.post(running.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
            via_gateway = await resp.read()
        async with http.post(mock.url + "/chat/completions", json={**body, "model": "mock-model"}) as resp:
            direct = await resp.read()

    def normalised(raw: bytes) -> bytes:
        return re.sub(rb'"created":\d+', b"", re.sub(rb'"id":"chatcmpl-mock-\d+"', b"", raw))

    assert normalised(via_gateway) == normalised(direct)
    assert b'"usage":{' in via_gateway


async def test_provider_without_usage_is_billed_by_the_documented_estimate(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 1000)
    raw = orjson.dumps({"model": "sovereign-alpha", "messages": MESSAGES, "max_tokens": 5, "stream": True})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "x-mock-no-usage": "1"}
    content = []
    async with aiohttp.ClientSession() as http:
        async with http.post(running.v1 + "/chat/completions", data=raw, headers=headers) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    delta = orjson.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        content.append(delta["content"])
    await running.gateway.drain()
    entry = (await accounts.ledger(tenant))[0]
    expected_in = math.ceil(len(raw) / 3) + 8
    # max(content chunks, ceil(chars / 4)), never above the cap the hold covered
    expected_out = min(max(len(content), math.ceil(sum(map(len, content)) / 4)), 5)
    assert entry["usage_source"] == "estimated"
    assert (entry["input_tokens"], entry["output_tokens"]) == (expected_in, expected_out)
    assert entry["credits"] == -(expected_in + 2 * expected_out)
    view = await assert_ledger_matches(accounts, tenant)
    assert view["reserved"] == 0


async def test_free_model_is_served_without_a_hold_and_recorded(mock, gateway_factory, redis_prefix):
    models = {"sovereign-free": {"upstream": "default", "free": True}}
    running, accounts = await metered(gateway_factory, mock, redis_prefix, models=models)
    tenant, key = await new_tenant(accounts, 0)
    reply = await running.openai(key).chat.completions.create(model="sovereign-free", messages=MESSAGES)
    assert reply.usage.completion_tokens == 8
    await running.gateway.drain()
    entry = (await accounts.ledger(tenant))[0]
    assert entry["credits"] == 0 and entry["output_tokens"] == 8 and entry["model"] == "sovereign-free"
    view = await accounts.tenant(tenant)
    assert (view["balance"], view["reserved"]) == (0, 0)


async def test_top_up_with_the_same_idempotency_key_applies_once(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, _ = await new_tenant(accounts, 10)
    results = await asyncio.gather(*(accounts.add_credits(tenant, 25, "invoice-7") for _ in range(20)))
    assert sum(applied for applied, _ in results) == 1
    view = await assert_ledger_matches(accounts, tenant)
    assert view["balance"] == 35


# Input is free and the output cap is fixed, so a request's hold equals its cost
# exactly and "the balance covers N requests" is exact.
OUTPUT_PRICED = {
    "sovereign-alpha": {"upstream": "default", "price": {"input_per_million": 0, "output_per_million": 2_000_000, "per_request": 1}},
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "streams-with-checkpoints"])
async def test_no_overspend_across_two_gateway_processes(mock, redis_prefix, shared_store, replicas, stream):
    """20× oversubscription across two replicas: exactly the balance is served, and refused requests barely reach the provider.

    Streams are slow enough (4 chunks 60 ms apart) for checkpoints every 50 ms
    to be written while they run. Speculative holds may send a request that is
    then refused to the provider; near exhaustion that stays under 1 % of the refusals.
    """
    n, max_tokens = 15, 4  # 300 requests in flight against a balance for 15
    cost = 2 * max_tokens + 1
    data = settings_data(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=PIPELINE, admin_token=None, models=OUTPUT_PRICED,
        units={"metering": {"checkpoint_seconds": 0.05}},
    )
    gateways = await replicas(data, 2)
    store = shared_store
    accounts = Accounts(store)
    tenant, key = await new_tenant(accounts, n * cost)
    headers = {"x-mock-delay-ms": "60"} if stream else {}
    clients = [openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60, default_headers=headers)
               for _, base in gateways]
    request = {"model": "sovereign-alpha", "messages": MESSAGES, "max_tokens": max_tokens}

    async def one(client: openai.AsyncOpenAI) -> str:
        if not stream:
            return (await client.chat.completions.create(**request))._request_id
        chunks = [chunk async for chunk in await client.chat.completions.create(**request, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return chunks[0].id

    results = await asyncio.gather(*(one(clients[i % 2]) for i in range(20 * n)), return_exceptions=True)
    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError) and r.status_code == 402]
    assert len(served) + len(refused) == 20 * n, [r for r in results if isinstance(r, Exception)][:3]
    assert len(served) == n
    # Provider requests that were not served: speculative holds refused after the request left.
    wasted = mock.stats["requests"] - len(served)
    assert wasted <= 0.01 * len(refused), (mock.stats["requests"], len(refused))
    for _ in range(100):  # streams settle just after their last chunk
        if (await accounts.tenant(tenant))["reserved"] == 0:
            break
        await asyncio.sleep(0.05)
    view = await assert_ledger_matches(accounts, tenant)
    assert (view["balance"], view["reserved"]) == (0, 0)
    charges = [e for e in await accounts.ledger(tenant, 1000) if e["type"] == "charge"]
    assert len(charges) == n and all(e["credits"] == -cost for e in charges)
    assert not any(e.get("estimated") for e in charges)  # checkpoints are only charged for a dead replica
    if not stream:
        assert {e["request_id"] for e in charges} == set(served)
    else:
        assert await store.redis.hlen(store.tenant_key(tenant, "hold_checkpoints")) > 0  # checkpoints were taken
    for client in clients:
        await client.close()


@pytest.mark.parametrize("client_caps", [{"max_completion_tokens": 1}, {"max_completion_tokens": 1, "max_tokens": 500}])
async def test_a_cap_the_provider_does_not_read_cannot_unbound_the_output(mock, gateway_factory, redis_prefix, client_caps):
    """The hold is sized from the client's cap; the provider must get that cap in the field it reads."""
    settings = make_settings(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=PIPELINE, admin_token=None,
        models={"sovereign-alpha": {"upstream": "default", "output_cap_param": "max_tokens",
                                    "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}}},
    )
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    tenant, key = await new_tenant(accounts, 1_000)
    reply = await running.openai(key).chat.completions.create(
        model="sovereign-alpha", messages=MESSAGES, extra_body=client_caps
    )
    sent = mock.requests[-1]["body"]
    assert sent["max_tokens"] == 1 and "max_completion_tokens" not in sent
    assert reply.usage.completion_tokens == 1
    await running.gateway.drain()
    await assert_ledger_matches(accounts, tenant)


ALPHA = {"upstream": "default", "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}}
BRIEF = {"alias_of": "sovereign-alpha", "system_prompt": "Be brief.", "defaults": {"max_tokens": 7, "n": 2}}


async def _needs(running, key: str, body: dict) -> int:
    """The credits a request's hold needs, read from its 402 (the tenant can afford none)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(running.v1 + "/chat/completions", data=orjson.dumps(body),
                             headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as resp:
            assert resp.status == 402, await resp.text()
            message = (await resp.json())["error"]["message"]
    return int(re.search(r"needs (\d+) credits", message).group(1))


async def test_a_models_defaults_and_system_prompt_are_held_for_and_capped(mock, gateway_factory, redis_prefix):
    """An alias' default `n` and cap count in the hold, and its cap is the one cap the provider gets."""
    # Same-length names, so the alias' effective body and the spelt-out one size alike.
    running, accounts = await metered(gateway_factory, mock, redis_prefix, models={"sovereign-alpha": ALPHA, "sovereign-brief": BRIEF})
    _, broke = await new_tenant(accounts, 1)
    system = {"role": "system", "content": "Be brief."}
    via_alias = await _needs(running, broke, {"model": "sovereign-brief", "messages": MESSAGES})
    spelt_out = await _needs(running, broke, {"max_tokens": 7, "n": 2, "model": "sovereign-alpha", "messages": [system, *MESSAGES]})
    one_choice = await _needs(running, broke, {"max_tokens": 7, "n": 1, "model": "sovereign-alpha", "messages": [system, *MESSAGES]})
    assert via_alias == spelt_out and spelt_out - one_choice == 7 * 2  # the second choice's 7 tokens at 2 credits
    assert mock.stats["requests"] == 0

    tenant, key = await new_tenant(accounts, 10_000)
    reply = await running.openai(key).chat.completions.create(model="sovereign-brief", messages=MESSAGES)
    sent = mock.requests[-1]["body"]
    assert sent["n"] == 2 and sent["max_completion_tokens"] == 7 and "max_tokens" not in sent
    assert sent["messages"] == [system, *MESSAGES]  # prepended once, although metering and the forwarder both look
    assert len(reply.choices) == 2 and reply.usage.completion_tokens <= 14
    # The client's own fields win over the defaults.
    await running.openai(key).chat.completions.create(model="sovereign-brief", messages=MESSAGES, n=1, max_tokens=3)
    assert (mock.requests[-1]["body"]["n"], mock.requests[-1]["body"]["max_completion_tokens"]) == (1, 3)
    await running.gateway.drain()
    await assert_ledger_matches(accounts, tenant)


@pytest.mark.parametrize("pipeline", [PIPELINE, []], ids=["metered", "passthrough"])
async def test_defaults_of_a_model_that_is_not_an_alias_apply_too(mock, gateway_factory, redis_prefix, pipeline):
    models = {"sovereign-alpha": {**ALPHA, "defaults": {"temperature": 0.1}, "system_prompt": "House rules."}}
    settings = make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=pipeline, admin_token=None, models=models)
    running = await gateway_factory(settings)
    key = (await new_tenant(Accounts(running.gateway.store), 10_000))[1] if pipeline else "sk-sov-live-none"
    await running.openai(key).chat.completions.create(model="sovereign-alpha", messages=MESSAGES)
    sent = mock.requests[-1]["body"]
    assert sent["temperature"] == 0.1
    assert sent["messages"] == [{"role": "system", "content": "House rules."}, *MESSAGES]
    await running.openai(key).chat.completions.create(model="sovereign-alpha", messages=MESSAGES, temperature=0.9)
    assert mock.requests[-1]["body"]["temperature"] == 0.9


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_usage_above_what_the_request_could_use_is_charged_at_the_bound(gateway_factory, redis_prefix, stream):
    """A provider reporting 100,000 tokens for a 5-token cap and a short prompt: charged the cap and the prompt's bytes.

    Before, the report was charged as given, and a balance of 1,000 went to -299,000.
    """
    usage = {"prompt_tokens": 100_000, "completion_tokens": 100_000, "total_tokens": 200_000}

    async def overreporting(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        message = {"role": "assistant", "content": "hi"}
        if not body.get("stream"):
            return web.json_response({"id": "c", "object": "chat.completion", "created": 1, "model": "m", "usage": usage,
                                      "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        for choices, extra in (([{"index": 0, "delta": message, "finish_reason": "stop"}], {}), ([], {"usage": usage})):
            await response.write(b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async with provider(overreporting) as url:
        settings = make_settings(url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=PIPELINE, admin_token=None)
        running = await gateway_factory(settings)
        accounts = Accounts(running.gateway.store)
        tenant, key = await new_tenant(accounts, 1000)
        client = running.openai(key)
        reply = await client.chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=5, stream=stream)
        if stream:
            async for _ in reply:
                pass
        await running.gateway.drain()
    (entry,) = [e for e in await accounts.ledger(tenant) if e["type"] == "charge"]
    assert entry["output_tokens"] == 5  # the held cap
    assert 0 < entry["input_tokens"] < 200  # the request's bytes (+8 per message), not 100,000
    view = await assert_ledger_matches(accounts, tenant)
    assert view["balance"] == 1000 - entry["input_tokens"] - 5 * 2 and view["reserved"] == 0
    clamped = running.gateway.metrics.usage_clamped
    assert clamped.labels("output", "sovereign-alpha")._value.get() == 1
    assert clamped.labels("input", "sovereign-alpha")._value.get() == 1


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_provider_that_ignores_stream_is_streamed_to_the_client_and_charged(gateway_factory, redis_prefix, include_usage):
    """The client asked for a stream and the provider sent a JSON completion.

    The SDK used to find no `data:` line in it and yield nothing, while the
    completion was charged.
    """
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}

    async def ignores_stream(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "c", "object": "chat.completion", "created": 1, "model": "m", "usage": usage,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three"},
                                               "finish_reason": "stop"}]})

    async with provider(ignores_stream) as url:
        settings = make_settings(url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=PIPELINE, admin_token=None)
        running = await gateway_factory(settings)
        accounts = Accounts(running.gateway.store)
        tenant, key = await new_tenant(accounts, 1000)
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = [chunk async for chunk in await running.openai(key).chat.completions.create(
            model="sovereign-alpha", messages=MESSAGES, max_tokens=5, stream=True, **options)]
        await running.gateway.drain()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == ["stop"]
    assert [c.usage.total_tokens for c in chunks if c.usage] == ([12] if include_usage else [])
    (entry,) = [e for e in await accounts.ledger(tenant) if e["type"] == "charge"]
    assert (entry["input_tokens"], entry["output_tokens"], entry["usage_source"]) == (9, 3, "reported")
    view = await assert_ledger_matches(accounts, tenant)
    assert view["balance"] == 1000 - 9 - 3 * 2 and view["reserved"] == 0
