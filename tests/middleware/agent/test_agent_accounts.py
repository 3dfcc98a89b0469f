"""Agent mode with keys, credits and sessions on the real Redis: every provider call of the loop is
held and settled under the request's id, a refused hold stops the loop, tenants stay apart."""

from __future__ import annotations

import uuid

import aiohttp
import openai
import pytest
import structlog.testing

from proxy.store.accounts import Accounts
from tests.middleware.agent.support import (
    AGENT,
    USAGE,
    ScriptedProvider,
    agent_config,
    text_completion,
    tool_call_completion,
)
from tests.support import REDIS_URL, until

PIPELINE = ["auth", "validation", "responses", "sessions", "legacy_functions", "agent", "metering"]
# settings_data prices sovereign-alpha at 1 credit per input token and 2 per output token.
CALL_COST = USAGE["prompt_tokens"] * 1 + USAGE["completion_tokens"] * 2
QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]


def weather_then_answer(body, n):
    if not any(m["role"] == "tool" for m in body["messages"]):
        return tool_call_completion([("call_w", "weather", {"city": "Oslo"})])
    return text_completion("Sunny.")


async def start(agent_gateway, url, mcp_http, redis_prefix, servers=None, logging=None, **agent):
    servers = servers or {"tools": {"url": mcp_http.url}}
    running = await agent_gateway(
        url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=PIPELINE, admin_token=None,
        units={"sessions": {"titles": False}}, **({"logging": logging} if logging else {}), **agent_config(servers, **agent),
    )
    return running, Accounts(running.gateway.store)


async def new_tenant(accounts: Accounts, credits: int) -> tuple[str, str]:
    tenant = "t-" + uuid.uuid4().hex[:10]
    await accounts.create_tenant(tenant, credits)
    key, _ = await accounts.create_key(tenant)
    return tenant, key


async def test_every_provider_call_and_priced_tool_call_is_charged_under_one_request_id(mcp_http, agent_gateway, redis_prefix):
    provider = ScriptedProvider(weather_then_answer)
    async with provider.serve() as url:
        running, accounts = await start(
            agent_gateway, url, mcp_http, redis_prefix, servers={"tools": {"url": mcp_http.url, "price_per_call": 7}}
        )
        tenant, key = await new_tenant(accounts, 100_000)
        raw = await running.openai(key).chat.completions.with_raw_response.create(model=AGENT, messages=QUESTION)
        assert raw.parse().choices[0].message.content == "Sunny."
        await running.gateway.drain()
        view = await accounts.tenant(tenant)
        ledger = await accounts.ledger(tenant)
    request_id = raw.headers["x-request-id"]
    charges = [e for e in ledger if e["type"] == "charge"]
    assert len(provider.requests) == 2
    assert {e["request_id"] for e in charges} == {request_id}
    assert sorted(e.get("kind") for e in charges) == ["request", "request", "tool_call"]
    assert len({e["id"] for e in charges}) == 3
    # The balance moved by exactly the provider calls' costs plus the tool's price.
    assert 100_000 - view["balance"] == 2 * CALL_COST + 7 == -sum(e["credits"] for e in charges)
    assert view["reserved"] == 0


async def test_a_priced_tool_call_counts_in_usage_and_the_keys_budget(mcp_http, agent_gateway, redis_prefix):
    """The tool's price is charged like a request: the usage aggregates and the key's budget see it too."""
    provider = ScriptedProvider(weather_then_answer)
    async with provider.serve() as url:
        running, accounts = await start(
            agent_gateway, url, mcp_http, redis_prefix, servers={"tools": {"url": mcp_http.url, "price_per_call": 7}}
        )
        tenant = "t-" + uuid.uuid4().hex[:10]
        await accounts.create_tenant(tenant, 100_000)
        key, record = await accounts.create_key(tenant, budget_credits=2 * CALL_COST + 7, budget_period="day")
        await running.openai(key).chat.completions.create(model=AGENT, messages=QUESTION)
        await running.gateway.drain()
        charged = -sum(e["credits"] for e in await accounts.ledger(tenant) if e["type"] == "charge")
        assert charged == 2 * CALL_COST + 7
        assert await accounts.key_spending(record) == {"spent": charged, "held": 0}  # the budget counted the tool call
        async with aiohttp.ClientSession() as http:
            async with http.get(running.v1 + "/usage", headers={"Authorization": f"Bearer {key}"}) as resp:
                usage = await resp.json()
        assert sum(row["credits"] for row in usage["data"]) == charged  # the aggregates equal the ledger
        # The budget is used up exactly: the next request is refused before anything runs.
        with pytest.raises(openai.APIStatusError) as refused:
            await running.openai(key).chat.completions.create(model=AGENT, messages=QUESTION)
        assert refused.value.status_code == 402 and refused.value.body["code"] == "key_budget_exceeded"


async def test_a_priced_tool_call_the_client_left_during_is_not_charged(mcp_http, agent_gateway, redis_prefix):
    """The client closes the stream while the (slow) tool runs: the call is cancelled, its hold released."""
    def slow_tool(body, n):
        return tool_call_completion([("call_s", "slow", {"seconds": 2.0})]) if n == 1 else text_completion("late")

    provider = ScriptedProvider(slow_tool)
    before = len(mcp_http.calls())
    async with provider.serve() as url:
        running, accounts = await start(
            agent_gateway, url, mcp_http, redis_prefix, servers={"tools": {"url": mcp_http.url, "price_per_call": 5}},
            show_tool_calls=True,  # the client reads until it sees the call
        )
        tenant, key = await new_tenant(accounts, 100_000)
        async with aiohttp.ClientSession() as http:
            response = await http.post(running.v1 + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                       json={"model": AGENT, "messages": QUESTION, "stream": True})
            async for line in response.content:
                if b"tool_calls" in line:
                    break
            await until(lambda: len(mcp_http.calls()) > before, timeout=5)  # the tool is running
            response.close()
        await until(lambda: running.gateway.in_flight == 0, timeout=5)
        await running.gateway.drain()
        kinds = [e.get("kind") for e in await accounts.ledger(tenant) if e["type"] == "charge"]
        view = await accounts.tenant(tenant)
        outcomes = {s.labels["outcome"]: s.value for m in running.gateway.metrics.tool_calls.collect() for s in m.samples
                    if s.name.endswith("_total")}
    assert kinds == ["request"]  # the provider call that asked for the tool; not the tool itself
    assert view["reserved"] == 0
    assert outcomes.get("cancelled") == 1 and "ok" not in outcomes


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_refused_hold_mid_loop_stops_it(mcp_http, agent_gateway, redis_prefix, stream):
    def big_then_answer(body, n):
        if n == 1:
            return tool_call_completion([("call_big", "big", {"size": 60_000})])
        return text_completion("never")

    provider = ScriptedProvider(big_then_answer)
    async with provider.serve() as url:
        running, accounts = await start(agent_gateway, url, mcp_http, redis_prefix, show_tool_calls=True)
        # Enough for the first call's hold; the second carries a 60 kB tool result (~20k tokens held).
        tenant, key = await new_tenant(accounts, 5_000)
        client = running.openai(key)
        if stream:
            seen = []
            with pytest.raises(openai.APIError) as failed:
                async for chunk in await client.chat.completions.create(model=AGENT, messages=QUESTION, stream=True, max_tokens=100):
                    seen.append(chunk)
            # The tool call was shown, then the stream ended with the in-band error.
            assert any(c.choices and c.choices[0].delta.tool_calls for c in seen)
            assert "Insufficient credits" in str(failed.value)
        else:
            with pytest.raises(openai.APIStatusError) as failed:
                await client.chat.completions.create(model=AGENT, messages=QUESTION, max_tokens=100)
            assert failed.value.status_code == 402
        # The refusal is all the client sees: it says that the first call was served and charged.
        assert "stopped before its provider call 2" in str(failed.value) and "are charged" in str(failed.value)
        await running.gateway.drain()
        view = await accounts.tenant(tenant)
    assert len(provider.requests) == 1  # the refused call never reached the provider
    assert view["balance"] == 5_000 - CALL_COST and view["reserved"] == 0


async def test_a_hold_refused_before_any_output_is_a_402(mcp_http, agent_gateway, redis_prefix):
    provider = ScriptedProvider(weather_then_answer)
    async with provider.serve() as url:
        running, accounts = await start(agent_gateway, url, mcp_http, redis_prefix)
        _, key = await new_tenant(accounts, 3)
        with pytest.raises(openai.APIStatusError) as failed:
            await running.openai(key).chat.completions.create(model=AGENT, messages=QUESTION, stream=True)
    assert failed.value.status_code == 402
    assert provider.requests == []


@pytest.mark.parametrize("keep", [False, True], ids=["final-only", "keep-tool-messages"])
async def test_sessions_store_the_final_answer_and_tenants_stay_apart(mcp_http, agent_gateway, redis_prefix, keep):
    provider = ScriptedProvider(weather_then_answer)
    async with provider.serve() as url:
        running, accounts = await start(agent_gateway, url, mcp_http, redis_prefix, keep_tool_messages=keep)
        _, key_a = await new_tenant(accounts, 100_000)
        _, key_b = await new_tenant(accounts, 100_000)
        session = {"X-Session-ID": "shared-session"}
        await running.openai(key_a).chat.completions.create(model=AGENT, messages=QUESTION, stream=True, extra_headers=session)
        response_a = await running.openai(key_a).responses.create(model=AGENT, input="Weather?")
        async with aiohttp.ClientSession() as http:
            async with http.get(running.v1 + "/sessions/shared-session", headers={"Authorization": f"Bearer {key_a}"}) as r:
                stored = (await r.json())["messages"]
            async with http.get(running.v1 + "/sessions/shared-session", headers={"Authorization": f"Bearer {key_b}"}) as r:
                assert r.status == 404
        await running.openai(key_b).chat.completions.create(
            model=AGENT, messages=[{"role": "user", "content": "B here"}], extra_headers=session
        )
        client_b = running.openai(key_b)
        with pytest.raises(openai.NotFoundError):
            await client_b.responses.retrieve(response_a.id)
        with pytest.raises(openai.BadRequestError):
            await client_b.responses.create(model=AGENT, input="more", previous_response_id=response_a.id)
    roles = [m["role"] for m in stored]
    if keep:
        assert roles == ["user", "assistant", "tool", "assistant"]
        assert stored[1]["tool_calls"][0]["function"]["name"] == "weather"
    else:
        assert roles == ["user", "assistant"]
        assert "tool_calls" not in stored[1]
    assert stored[-1]["content"] == "Sunny."
    # B's first provider call saw only B's message: nothing of A's session or responses.
    b_first = next(r for r in provider.requests if r["messages"][-1]["content"] == "B here")
    assert b_first["messages"] == [{"role": "user", "content": "B here"}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_access_log_line_has_the_whole_loops_tokens_and_credits(mcp_http, agent_gateway, redis_prefix, stream):
    """The line used to say credits null (and, for a stream, no tokens): the loop's calls were charged on their own."""
    provider = ScriptedProvider(weather_then_answer)
    async with provider.serve() as url:
        running, accounts = await start(
            agent_gateway, url, mcp_http, redis_prefix, servers={"tools": {"url": mcp_http.url, "price_per_call": 7}},
            logging={"level": "info", "access_log": True},
        )
        tenant, key = await new_tenant(accounts, 100_000)
        with structlog.testing.capture_logs() as logs:
            reply = await running.openai(key).chat.completions.create(model=AGENT, messages=QUESTION, stream=stream)
            if stream:
                async for _ in reply:
                    pass
            await until(lambda: any(entry["event"] == "request" for entry in logs), timeout=5)
        await running.gateway.drain()
        charged = -sum(e["credits"] for e in await accounts.ledger(tenant) if e["type"] == "charge")
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert charged == 2 * CALL_COST + 7
    assert (line["credits"], line["usage_source"]) == (charged, "reported")
    assert (line["input_tokens"], line["output_tokens"]) == (2 * USAGE["prompt_tokens"], 2 * USAGE["completion_tokens"])
