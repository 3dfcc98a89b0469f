"""Sessions unit: history in front of each turn, atomic appends, bounds, expiry, the session API.

Real sockets, the official openai SDK as the client, the simulated provider upstream, and
the real Redis (plus the embedded store where the store matters for parity).
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import aiohttp
import openai
import pytest

from proxy.store.accounts import Accounts
from proxy.core.settings import StoreSettings
from proxy.store.store import Store
from tests.support import REDIS_URL, RunningGateway, free_port, make_settings

HEADER = "X-Session-ID"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    }
]


async def start(mock, gateway_factory, store_url: str, prefix: str, units: dict[str, Any] | None = None,
                pipeline: list[str] | None = None, **overrides: Any) -> RunningGateway:
    settings = make_settings(
        mock.url, store_url=store_url, prefix=prefix, pipeline=pipeline or ["sessions"],
        units={"sessions": {"titles": False, **(units or {})}}, **overrides,
    )
    return await gateway_factory(settings)


async def turn(client: openai.AsyncOpenAI, session: str | None, messages: list[dict[str, Any]],
               stream: bool = False, model: str = "sovereign-alpha", extra_headers: dict[str, str] | None = None,
               **kwargs: Any) -> tuple[str | None, dict[str, Any]]:
    """One chat request; returns the echoed session id and the assistant message the client saw."""
    headers = {HEADER: session} if session is not None else {}
    headers.update(extra_headers or {})
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=messages, stream=stream, extra_headers=headers, **kwargs
    )
    echoed = raw.headers.get(HEADER)
    parsed = raw.parse()
    if not stream:
        message = parsed.choices[0].message
        out: dict[str, Any] = {"role": "assistant", "content": message.content}
        if message.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in message.tool_calls]
        return echoed, out
    text, calls = [], {}
    async for chunk in parsed:
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            for frag in choice.delta.tool_calls or []:
                slot = calls.setdefault(frag.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                slot["id"] = frag.id or slot["id"]
                if frag.function and frag.function.name:
                    slot["function"]["name"] += frag.function.name
                if frag.function and frag.function.arguments:
                    slot["function"]["arguments"] += frag.function.arguments
    out = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        out["tool_calls"] = [calls[i] for i in sorted(calls)]
    return echoed, out


async def api(running: RunningGateway, method: str, path: str, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, running.v1 + path, headers=headers) as resp:
            return resp.status, await resp.json()


async def session_keys(running: RunningGateway) -> list[str]:
    redis = running.gateway.store.redis
    return [k async for k in redis.scan_iter(match=f"{running.gateway.store.prefix}:*session*", count=1000)]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_second_turn_carries_first_turn_and_reply(mock, gateway_factory, store_url, redis_prefix, stream):
    running = await start(mock, gateway_factory, store_url, redis_prefix)
    client = running.openai()
    first = {"role": "user", "content": "hello one"}
    echoed, reply1 = await turn(client, "chat-1", [first], stream=stream)
    assert echoed == "chat-1"
    assert reply1["content"].startswith("hello one")
    second = {"role": "user", "content": "second turn"}
    echoed, reply2 = await turn(client, "chat-1", [second], stream=stream)
    assert echoed == "chat-1"
    assert mock.requests[-1]["body"]["messages"] == [first, reply1, second]

    status, body = await api(running, "GET", "/sessions/chat-1")
    assert status == 200
    assert body["messages"] == [first, reply1, second, reply2]
    assert body["message_count"] == 4 and body["object"] == "session"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_tool_calls_are_stored_whole(mock, gateway_factory, redis_prefix, stream):
    """The assistant's tool calls (streamed: assembled from fragments by index) go into the history."""
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix)
    client = running.openai()
    ask = {"role": "user", "content": "weather please"}
    _, reply = await turn(client, "tools", [ask], stream=stream, tools=TOOLS)
    assert reply["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"value","days":1}'}
    result = {"role": "tool", "tool_call_id": reply["tool_calls"][0]["id"], "content": "sunny"}
    await turn(client, "tools", [result], stream=stream)
    sent = mock.requests[-1]["body"]["messages"]
    assert sent[0] == ask and sent[2] == result
    assert sent[1]["role"] == "assistant" and sent[1]["tool_calls"] == reply["tool_calls"]


async def test_system_messages(mock, gateway_factory, redis_prefix):
    """A stored system message stays first; a request's own leading one replaces it, in place."""
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix)
    client = running.openai()
    sys1 = {"role": "system", "content": "be brief"}
    u1 = {"role": "user", "content": "one"}
    _, a1 = await turn(client, "sys", [sys1, u1])
    u2 = {"role": "user", "content": "two"}
    _, a2 = await turn(client, "sys", [u2])
    assert mock.requests[-1]["body"]["messages"] == [sys1, u1, a1, u2]
    sys2 = {"role": "system", "content": "be verbose"}
    u3 = {"role": "user", "content": "three"}
    await turn(client, "sys", [sys2, u3])
    assert mock.requests[-1]["body"]["messages"] == [sys2, u1, a1, u2, a2, u3]
    _, body = await api(running, "GET", "/sessions/sys")
    assert body["messages"][0] == sys2 and body["message_count"] == 7


async def test_invalid_session_id_is_400(mock, gateway_factory, redis_prefix):
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix)
    client = running.openai()
    for bad in ["", "x" * 129, "has space", "semi;colon", "../../x", "a*b"]:
        with pytest.raises(openai.BadRequestError) as info:
            await turn(client, bad, [{"role": "user", "content": "hi"}])
        assert info.value.body["param"] == HEADER
    assert mock.requests == []
    assert (await turn(client, "a.B_c:d-" + "9" * 120, [{"role": "user", "content": "hi"}]))[0] == "a.B_c:d-" + "9" * 120


async def test_concurrent_turns_on_one_session_all_land(mock, gateway_factory, redis_prefix):
    """200 turns at once on one session: all 400 messages are stored, none lost or duplicated."""
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix, units={"max_messages": 1000})
    client = running.openai()
    n = 200
    results = await asyncio.gather(
        *(turn(client, "busy", [{"role": "user", "content": f"turn-{i}"}], stream=bool(i % 2)) for i in range(n))
    )
    assert all(echoed == "busy" for echoed, _ in results)
    status, body = await api(running, "GET", "/sessions/busy")
    assert status == 200 and body["message_count"] == 2 * n
    messages = body["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert sorted(users) == sorted(f"turn-{i}" for i in range(n))
    # Every turn is stored whole: its user message directly followed by its own reply.
    for user, assistant in zip(messages[::2], messages[1::2]):
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"].startswith(user["content"])


async def test_expiry(mock, gateway_factory, redis_prefix):
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix, units={"ttl_seconds": 1})
    client = running.openai()
    await turn(client, "short", [{"role": "user", "content": "hi"}])
    assert (await api(running, "GET", "/sessions/short"))[0] == 200
    assert [s["id"] for s in (await api(running, "GET", "/sessions"))[1]["data"]] == ["short"]
    keys = await session_keys(running)
    ttls = [await running.gateway.store.redis.pttl(k) for k in keys]
    assert len(keys) == 3 and all(0 < ttl <= 1000 for ttl in ttls)  # meta, messages, index
    await asyncio.sleep(1.3)
    status, body = await api(running, "GET", "/sessions/short")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert (await api(running, "GET", "/sessions"))[1]["data"] == []
    assert await session_keys(running) == []
    await turn(client, "short", [{"role": "user", "content": "again"}])
    assert mock.requests[-1]["body"]["messages"] == [{"role": "user", "content": "again"}]


async def test_trimming_keeps_system_message_and_whole_turns(mock, gateway_factory, store_url, redis_prefix):
    running = await start(mock, gateway_factory, store_url, redis_prefix, units={"max_messages": 5})
    client = running.openai()
    system = {"role": "system", "content": "rules"}
    turns = []
    for i in range(4):
        user = {"role": "user", "content": f"u{i}"}
        _, reply = await turn(client, "trim", ([system] if i == 0 else []) + [user])
        turns.append([user, reply])
    _, body = await api(running, "GET", "/sessions/trim")
    assert body["messages"] == [system, *turns[2], *turns[3]]
    assert body["message_count"] == 5
    await turn(client, "trim", [{"role": "user", "content": "next"}])
    assert mock.requests[-1]["body"]["messages"] == [system, *turns[2], *turns[3], {"role": "user", "content": "next"}]


async def test_token_bound_trims_oldest_turns(mock, gateway_factory, redis_prefix):
    # Estimate: bytes of stored JSON / 4 + 4. The system message is ~12 tokens, a turn here ~36
    # ("question N" + the mock's 4-fold echo), so 120 leaves room for exactly three turns.
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix, units={"max_tokens": 120})
    client = running.openai()
    system = {"role": "system", "content": "rules"}
    for i in range(6):
        await turn(client, "tok", ([system] if i == 0 else []) + [{"role": "user", "content": f"question {i}"}])
    _, body = await api(running, "GET", "/sessions/tok")
    messages = body["messages"]
    assert messages[0] == system and len(messages) == 7
    assert [m["content"] for m in messages[1::2]] == ["question 3", "question 4", "question 5"]
    assert all(m["role"] == "assistant" for m in messages[2::2])


@pytest.mark.parametrize("bound", [{"max_tokens": 200}, {"max_messages": 3}], ids=["tokens", "messages"])
async def test_a_turn_of_tool_results_keeps_the_tool_calls_it_answers(mock, gateway_factory, store_url, redis_prefix, bound):
    """Trimming never leaves a tool result without the assistant message whose call it answers.

    The client's second request holds only the tool result: the turn it continues
    (the user's question and the assistant's tool calls) stays with it, even over the
    bound, and goes at the next user turn. Before, it was dropped and every later turn
    of the session was refused by the provider (a `tool` message without its call).
    """
    running = await start(mock, gateway_factory, store_url, redis_prefix, units=bound)
    client = running.openai()
    ask = {"role": "user", "content": "read the file"}
    _, call_reply = await turn(client, "tool-trim", [ask], tools=TOOLS)
    result = {"role": "tool", "tool_call_id": call_reply["tool_calls"][0]["id"], "content": "x" * 2000}
    _, answer = await turn(client, "tool-trim", [result])
    _, body = await api(running, "GET", "/sessions/tool-trim")
    assert body["messages"] == [ask, call_reply, result, answer]  # over the bound, whole
    follow_up = {"role": "user", "content": "thanks"}
    _, last = await turn(client, "tool-trim", [follow_up])
    assert mock.requests[-1]["body"]["messages"] == [ask, call_reply, result, answer, follow_up]
    _, body = await api(running, "GET", "/sessions/tool-trim")
    assert body["messages"] == [follow_up, last]  # the old turn went whole


async def test_nothing_stored_on_error_or_broken_stream(mock, gateway_factory, redis_prefix):
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix, routing={"attempts": 1})
    client = running.openai()
    with pytest.raises(openai.InternalServerError):
        await turn(client, "fail", [{"role": "user", "content": "x"}], extra_headers={"x-mock-fail-status": "500"})
    with pytest.raises(openai.BadRequestError):
        await turn(client, "fail", [{"role": "user", "content": "x"}], extra_headers={"x-mock-fail-status": "400"})
    # The provider cuts the stream after 2 chunks: the client sees an error event, nothing is kept.
    with pytest.raises(openai.APIError):
        await turn(client, "fail", [{"role": "user", "content": "x"}], stream=True,
                   extra_headers={"x-mock-cut-after": "2"})
    assert (await api(running, "GET", "/sessions/fail"))[0] == 404
    assert await session_keys(running) == []


async def test_client_disconnect_stores_nothing(mock, gateway_factory, redis_prefix):
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix)
    client = running.openai()
    stream = await client.chat.completions.create(
        model="sovereign-alpha", messages=[{"role": "user", "content": "long"}], stream=True,
        extra_headers={HEADER: "gone", "x-mock-chunks": "50", "x-mock-delay-ms": "20"},
    )
    async for _ in stream:
        break
    await stream.close()
    for _ in range(50):  # the gateway sees the disconnect and closes the provider stream
        if mock.stats["client_disconnects"]:
            break
        await asyncio.sleep(0.02)
    assert mock.stats["client_disconnects"] == 1
    await asyncio.sleep(0.2)
    assert (await api(running, "GET", "/sessions/gone"))[0] == 404


async def test_auto_create_off_by_default(mock, gateway_factory, redis_prefix):
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix)
    client = running.openai()
    echoed, _ = await turn(client, None, [{"role": "user", "content": "keep nothing"}])
    assert echoed is None
    assert await session_keys(running) == []
    assert (await api(running, "GET", "/sessions"))[1]["data"] == []


async def test_auto_create_on(mock, gateway_factory, store_url, redis_prefix):
    running = await start(mock, gateway_factory, store_url, redis_prefix, units={"auto_create": True})
    client = running.openai()
    echoed, reply = await turn(client, None, [{"role": "user", "content": "keep me"}])
    assert echoed is not None and echoed.startswith("sess_") and len(echoed) >= 29
    other, _ = await turn(client, None, [{"role": "user", "content": "another"}])
    assert other != echoed
    status, body = await api(running, "GET", f"/sessions/{echoed}")
    assert status == 200 and body["messages"] == [{"role": "user", "content": "keep me"}, reply]
    await turn(client, echoed, [{"role": "user", "content": "more"}])
    assert mock.requests[-1]["body"]["messages"][:2] == body["messages"]


async def test_list_paginate_get_delete(mock, gateway_factory, store_url, redis_prefix):
    running = await start(mock, gateway_factory, store_url, redis_prefix)
    client = running.openai()
    for i in range(5):
        await turn(client, f"s{i}", [{"role": "user", "content": f"hi {i}"}])
        await asyncio.sleep(0.002)  # distinct updated_at (ms) for a stable order
    status, page = await api(running, "GET", "/sessions?limit=2")
    assert status == 200 and page["object"] == "list"
    assert [s["id"] for s in page["data"]] == ["s4", "s3"]
    assert page["first_id"] == "s4" and page["last_id"] == "s3" and page["has_more"] is True
    item = page["data"][0]
    assert set(item) == {"id", "object", "title", "created_at", "updated_at", "message_count"}
    assert item["message_count"] == 2 and item["title"] is None and item["created_at"] > 1_600_000_000
    _, page2 = await api(running, "GET", "/sessions?limit=2&after=s3")
    assert [s["id"] for s in page2["data"]] == ["s2", "s1"] and page2["has_more"] is True
    _, page3 = await api(running, "GET", "/sessions?limit=2&after=s1")
    assert [s["id"] for s in page3["data"]] == ["s0"] and page3["has_more"] is False
    # A new turn moves a session to the front.
    await turn(client, "s0", [{"role": "user", "content": "back"}])
    _, page = await api(running, "GET", "/sessions")
    assert [s["id"] for s in page["data"]] == ["s0", "s4", "s3", "s2", "s1"]
    for query, param in [("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"), ("after=nope", "after")]:
        status, body = await api(running, "GET", f"/sessions?{query}")
        assert status == 400 and body["error"]["param"] == param

    status, body = await api(running, "DELETE", "/sessions/s2")
    assert status == 200 and body == {"id": "s2", "object": "session", "deleted": True}
    assert (await api(running, "GET", "/sessions/s2"))[0] == 404
    assert (await api(running, "DELETE", "/sessions/s2"))[0] == 404
    _, page = await api(running, "GET", "/sessions")
    assert [s["id"] for s in page["data"]] == ["s0", "s4", "s3", "s1"]
    await turn(client, "s2", [{"role": "user", "content": "fresh"}])
    assert mock.requests[-1]["body"]["messages"] == [{"role": "user", "content": "fresh"}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_session_deleted_while_a_turn_runs_stays_deleted(mock, gateway_factory, store_url, redis_prefix, stream):
    """The turn in flight still gets its reply, but does not bring the deleted session back."""
    running = await start(mock, gateway_factory, store_url, redis_prefix)
    client = running.openai()
    await turn(client, "doomed", [{"role": "user", "content": "first"}])
    slow = {HEADER: "doomed", "x-mock-first-byte-delay-ms": "400"}
    second = asyncio.create_task(
        client.chat.completions.with_raw_response.create(
            model="sovereign-alpha", messages=[{"role": "user", "content": "second"}], stream=stream, extra_headers=slow
        )
    )
    async with asyncio.timeout(5):  # the provider has the second turn (with the first as history)
        while len(mock.requests) < 2:
            await asyncio.sleep(0.005)
    assert len(mock.requests[1]["body"]["messages"]) == 3
    assert (await api(running, "DELETE", "/sessions/doomed"))[0] == 200
    raw = await second
    if stream:
        assert [chunk async for chunk in raw.parse()]  # the whole stream was relayed
    else:
        assert raw.parse().choices[0].message.content
        assert raw.headers["X-Session-Saved"] == "false"
    assert (await api(running, "GET", "/sessions/doomed"))[0] == 404
    if store_url == REDIS_URL:
        assert await session_keys(running) == []  # no meta, messages or index entry came back
    _, page = await api(running, "GET", "/sessions")
    assert page["data"] == []
    # The id is free again: the next turn starts a new session, without the old history.
    await turn(client, "doomed", [{"role": "user", "content": "anew"}])
    assert mock.requests[-1]["body"]["messages"] == [{"role": "user", "content": "anew"}]
    status, view = await api(running, "GET", "/sessions/doomed")
    assert status == 200 and view["message_count"] == 2


async def test_tenant_isolation_with_shared_session_id(mock, gateway_factory, redis_prefix):
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix, pipeline=["auth", "sessions"])
    accounts = Accounts(running.gateway.store)
    keys = {}
    for tenant in ("acme", "globex"):
        await accounts.create_tenant(tenant, 1000)
        keys[tenant], _ = await accounts.create_key(tenant)
    acme, globex = running.openai(keys["acme"]), running.openai(keys["globex"])
    _, a_reply = await turn(acme, "shared", [{"role": "user", "content": "acme secret"}])
    _, g_reply = await turn(globex, "shared", [{"role": "user", "content": "globex question"}])
    # Globex's turn did not see Acme's history.
    assert mock.requests[-1]["body"]["messages"] == [{"role": "user", "content": "globex question"}]
    await turn(acme, "shared", [{"role": "user", "content": "again"}])
    assert mock.requests[-1]["body"]["messages"][:2] == [{"role": "user", "content": "acme secret"}, a_reply]

    status, body = await api(running, "GET", "/sessions/shared", keys["globex"])
    assert status == 200 and body["messages"] == [{"role": "user", "content": "globex question"}, g_reply]
    _, listing = await api(running, "GET", "/sessions", keys["globex"])
    assert [s["id"] for s in listing["data"]] == ["shared"] and listing["data"][0]["message_count"] == 2
    await turn(acme, "acme-only", [{"role": "user", "content": "private"}])
    status, body = await api(running, "GET", "/sessions/acme-only", keys["globex"])
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await api(running, "DELETE", "/sessions/acme-only", keys["globex"])
    assert status == 404 and body["error"]["code"] == "not_found"
    assert (await api(running, "GET", "/sessions/acme-only", keys["acme"]))[0] == 200
    assert (await api(running, "DELETE", "/sessions/shared", keys["globex"]))[0] == 200
    _, body = await api(running, "GET", "/sessions/shared", keys["acme"])
    assert body["message_count"] == 4
    assert (await api(running, "GET", "/sessions"))[0] == 401


async def test_alias_model_with_session(mock, gateway_factory, redis_prefix):
    """A synthetic model: listed with its owned_by; its system prompt goes first, the provider gets its model name."""
    alias = {"alias_of": "sovereign-alpha", "system_prompt": "You are the Sovereign assistant.", "owned_by": "sovereign-sessions"}
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix, models={"sovereign-assistant": alias})
    client = running.openai()
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed["sovereign-assistant"] == "sovereign-sessions" and "sovereign-alpha" in listed
    u1 = {"role": "user", "content": "first"}
    _, a1 = await turn(client, "alias", [u1], model="sovereign-assistant")
    u2 = {"role": "user", "content": "second"}
    await turn(client, "alias", [u2], model="sovereign-assistant", stream=True)
    sent = mock.requests[-1]["body"]
    assert sent["model"] == "mock-model"
    assert sent["messages"] == [{"role": "system", "content": "You are the Sovereign assistant."}, u1, a1, u2]
    # The alias' prompt is the gateway's, not part of the client's stored history.
    _, body = await api(running, "GET", "/sessions/alias")
    assert body["messages"][:3] == [u1, a1, u2]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_legacy_function_call_is_stored(mock, gateway_factory, redis_prefix, stream):
    """Behind legacy_functions the reply carries `function_call`; it is stored and replayed."""
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix, pipeline=["sessions", "legacy_functions"])
    client = running.openai()
    functions = [TOOLS[0]["function"]]
    ask = {"role": "user", "content": "weather please"}
    response = await client.chat.completions.create(
        model="sovereign-alpha", messages=[ask], stream=stream, extra_body={"functions": functions},
        extra_headers={HEADER: "legacy"},
    )
    if stream:
        name, arguments = "", ""
        async for chunk in response:
            for choice in chunk.choices:
                if choice.delta.function_call:
                    name += choice.delta.function_call.name or ""
                    arguments += choice.delta.function_call.arguments or ""
    else:
        name, arguments = response.choices[0].message.function_call.name, response.choices[0].message.function_call.arguments
    assert (name, arguments) == ("get_weather", '{"city":"value","days":1}')
    _, body = await api(running, "GET", "/sessions/legacy")
    assert body["messages"][1]["function_call"] == {"name": name, "arguments": arguments}

    result = {"role": "function", "name": "get_weather", "content": "sunny"}
    await client.chat.completions.create(
        model="sovereign-alpha", messages=[result], extra_body={"functions": functions}, extra_headers={HEADER: "legacy"}
    )
    sent = mock.requests[-1]["body"]["messages"]
    assert sent[0] == ask
    assert sent[1]["tool_calls"][0]["function"] == {"name": name, "arguments": arguments}
    assert sent[2]["role"] == "tool" and sent[2]["tool_call_id"] == sent[1]["tool_calls"][0]["id"]


async def test_full_default_pipeline(mock, gateway_factory, redis_prefix):
    """Every shipped unit in its default order: a session turn still carries the history, and is metered."""
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix,
                          pipeline=["auth", "rate_limit", "validation", "responses", "sessions", "legacy_functions", "metering"])
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("full", 100_000)
    key, _ = await accounts.create_key("full")
    client = running.openai(key)
    u1 = {"role": "user", "content": "hello"}
    _, a1 = await turn(client, "full", [u1], stream=True)
    u2 = {"role": "user", "content": "again"}
    echoed, _ = await turn(client, "full", [u2])
    assert echoed == "full"
    assert mock.requests[-1]["body"]["messages"] == [u1, a1, u2]
    # The Responses API is not affected by the header.
    raw = await client.responses.with_raw_response.create(model="sovereign-alpha", input="hi", extra_headers={HEADER: "full"})
    assert HEADER not in raw.headers
    assert mock.requests[-1]["body"]["messages"][-1]["content"] == "hi" and len(mock.requests[-1]["body"]["messages"]) <= 2
    await running.gateway.drain(5)
    charges = [e for e in await accounts.ledger("full") if e["type"] == "charge"]
    assert len(charges) == 3


async def test_store_down_fails_closed(mock, gateway_factory, tmp_path):
    """Redis unreachable: a session turn is refused with 503 before anything reaches the provider."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}"
        probe = Store(StoreSettings(url=url))
        for _ in range(100):  # until the new server accepts connections
            if await probe.ping():
                break
            await probe.close()
            await asyncio.sleep(0.05)
        await probe.close()
        running = await start(mock, gateway_factory, url, "sovtest-down")
        client = running.openai()
        await turn(client, "down", [{"role": "user", "content": "one"}])
        server.kill()
        server.wait(10)
        sent = len(mock.requests)
        with pytest.raises(openai.APIStatusError) as info:
            await turn(client, "down", [{"role": "user", "content": "two"}])
        assert info.value.status_code == 503 and info.value.body["code"] == "store_unavailable"
        assert len(mock.requests) == sent
    finally:
        server.kill()
        server.wait(10)


async def test_an_unhashable_role_is_not_a_crash(mock, gateway_factory):
    import aiohttp

    from tests.support import make_settings

    running = await gateway_factory(make_settings(mock.url, admin_token=None, pipeline=["sessions"]))
    body = {"model": "sovereign-alpha", "messages": [{"role": ["system"], "content": "x"}, {"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(running.v1 + "/chat/completions", json=body, headers={"X-Session-ID": "odd"}) as resp:
            # Without validation the provider judges the body; the gateway itself must not 500.
            assert resp.status < 500


async def test_a_reasoning_only_streamed_reply_is_stored_and_replayed(mock, gateway_factory):
    from tests.support import make_settings

    running = await gateway_factory(make_settings(mock.url, admin_token=None, pipeline=["sessions"]))
    client = running.openai()
    # A streamed reply with reasoning deltas only: no content delta, no tool call.
    stream = await client.chat.completions.create(
        model="sovereign-alpha", messages=[{"role": "user", "content": "think"}], stream=True,
        extra_headers={"X-Session-ID": "reasoning-only", "x-mock-reasoning-chunks": "3", "x-mock-chunks": "0"},
    )
    async for chunk in stream:
        assert not (chunk.choices and chunk.choices[0].delta.content)
    await client.chat.completions.create(
        model="sovereign-alpha", messages=[{"role": "user", "content": "again"}],
        extra_headers={"X-Session-ID": "reasoning-only"},
    )
    history = mock.requests[-1]["body"]["messages"]
    assert history[1]["role"] == "assistant" and history[1]["content"] is not None


def test_a_streamed_reply_of_reasoning_only_is_assembled_with_empty_content():
    """Some providers send reasoning deltas and no content field at all; content null is unreplayable."""
    from middleware.sessions.unit import _StreamedMessage

    builder = _StreamedMessage()
    builder.feed({"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "hm"}}]})
    builder.feed({"choices": [{"index": 0, "delta": {"reasoning_content": " ok"}, "finish_reason": "length"}]})
    assert builder.finished
    assert builder.message() == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_refusal_is_stored_as_what_the_assistant_said(mock, gateway_factory, redis_prefix, stream):
    running = await start(mock, gateway_factory, REDIS_URL, redis_prefix)
    client = running.openai()
    ask = {"role": "user", "content": "where?"}
    await turn(client, "refused", [ask], stream=stream, extra_headers={"x-mock-refuse": "No thanks."})
    _, body = await api(running, "GET", "/sessions/refused")
    assert body["messages"] == [ask, {"role": "assistant", "content": "No thanks. "}]
