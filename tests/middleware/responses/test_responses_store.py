"""Stored responses: retrieve, delete, input items, expiry, streams, and tenant isolation.

Runs on the real Redis and on the embedded store (`store_url` parity), with the
auth unit in front so stored responses belong to real tenants.
"""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest

from proxy.store.accounts import Accounts
from proxy.core.gateway import Gateway
from proxy.core.settings import ConfigError
from tests.support import make_settings

MODEL = "sovereign-alpha"
TTL = 3600


@pytest.fixture
async def running(mock, gateway_factory, store_url, redis_prefix):
    settings = make_settings(mock.url, store_url=store_url, prefix=redis_prefix, pipeline=["auth", "responses"],
                             units={"responses": {"store_ttl_seconds": TTL}})
    return await gateway_factory(settings)


@pytest.fixture
async def tenants(running):
    """Two tenants with one key each: (client of A, client of B)."""
    accounts = Accounts(running.gateway.store)
    clients = []
    for tenant in ("tenant-a", "tenant-b"):
        await accounts.create_tenant(tenant, 1000)
        key, _ = await accounts.create_key(tenant)
        clients.append(running.openai(key, _strict_response_validation=True))
    return clients


async def test_retrieve_and_delete(running, tenants):
    client, _ = tenants
    created = await client.responses.create(model=MODEL, input="keep this", metadata={"tag": "1"})
    fetched = await client.responses.retrieve(created.id)  # stored before the JSON reply returned
    assert fetched.model_dump() == created.model_dump()
    assert fetched.store is True and fetched.metadata == {"tag": "1"}

    key = running.gateway.store.tenant_key("tenant-a", "response", created.id)
    assert 0 < await running.gateway.store.redis.ttl(key) <= TTL

    deleted = await client.responses.delete(created.id)
    assert deleted is None  # the SDK returns None for a successful delete
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.retrieve(created.id)
    assert info.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(created.id)


async def test_the_reply_is_the_stored_record_byte_for_byte(running):
    """The Response object is serialised once, for the record and the reply: a GET returns the very bytes."""
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("tenant-raw", 1000)
    key, _ = await accounts.create_key("tenant-raw")
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(running.base_url + "/v1/responses", json={"model": MODEL, "input": "same bytes"}, headers=headers) as resp:
            assert resp.status == 200
            created = await resp.read()
        response_id = orjson.loads(created)["id"]
        async with http.get(f"{running.base_url}/v1/responses/{response_id}", headers=headers) as resp:
            assert resp.status == 200
            fetched = await resp.read()
    assert fetched == created
    assert orjson.loads(created)["output"][0]["content"][0]["text"]  # a real, non-empty answer


async def test_delete_answer_shape(tenants):
    client, _ = tenants
    created = await client.responses.create(model=MODEL, input="x")
    answer = await client.delete(f"/responses/{created.id}", cast_to=object)
    assert answer == {"id": created.id, "object": "response", "deleted": True}


async def test_input_items(tenants):
    client, _ = tenants
    first = await client.responses.create(model=MODEL, input="start", tools=[
        {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}])
    call = first.output[0]
    second = await client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "done"},
            {"role": "user", "content": [{"type": "input_text", "text": "and now?"}]},
            {"role": "assistant", "content": "noted"},
        ],
    )
    page = await client.responses.input_items.list(second.id, order="asc")
    items = page.data
    # Only this request's input, not the chained history.
    assert [item.type for item in items] == ["function_call_output", "message", "message"]
    assert items[0].call_id == call.call_id and items[0].output == "done"
    assert items[1].role == "user" and items[1].content[0].text == "and now?"
    assert items[2].role == "assistant" and items[2].content[0].text == "noted"
    assert len({item.id for item in items}) == 3

    raw = await client.get(f"/responses/{second.id}/input_items", cast_to=object)
    assert raw["object"] == "list" and raw["has_more"] is False
    assert [i["id"] for i in raw["data"]] == [item.id for item in reversed(items)]  # default order: desc
    assert raw["first_id"] == raw["data"][0]["id"] and raw["last_id"] == raw["data"][-1]["id"]

    # Paging with limit/after walks every item exactly once.
    seen = [item.id async for item in client.responses.input_items.list(second.id, order="asc", limit=1)]
    assert seen == [item.id for item in items]


async def test_store_false_is_not_kept(tenants):
    client, _ = tenants
    created = await client.responses.create(model=MODEL, input="forget me", store=False)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="x", previous_response_id=created.id)
    assert info.value.body["code"] == "previous_response_not_found"


async def test_streamed_response_is_stored(running, tenants, mock):
    client, _ = tenants
    async with client.responses.stream(model=MODEL, input="streamed words") as stream:
        final = await stream.get_final_response()
    await running.gateway.drain()  # the stored record is written in the background
    fetched = await client.responses.retrieve(final.id)
    assert fetched.status == "completed" and fetched.output_text == final.output_text
    follow = await client.responses.create(model=MODEL, input="next", previous_response_id=final.id)
    assert follow.status == "completed"
    assert mock.requests[-1]["body"]["messages"][:2] == [
        {"role": "user", "content": "streamed words"},
        {"role": "assistant", "content": final.output_text},
    ]


async def test_tenant_isolation(tenants, mock):
    client_a, client_b = tenants
    mine = await client_a.responses.create(model=MODEL, input="secret of a")
    with pytest.raises(openai.NotFoundError) as info:
        await client_b.responses.retrieve(mine.id)
    assert info.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        await client_b.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        await client_b.responses.delete(mine.id)
    requests_before = len(mock.requests)
    with pytest.raises(openai.BadRequestError) as info:
        await client_b.responses.create(model=MODEL, input="x", previous_response_id=mine.id)
    assert info.value.body["code"] == "previous_response_not_found"
    assert len(mock.requests) == requests_before  # nothing of A's conversation reached the provider
    # B's failed attempts changed nothing for A.
    assert (await client_a.responses.retrieve(mine.id)).output_text == mine.output_text


async def test_routes_require_a_key(running, tenants):
    client, _ = tenants
    created = await client.responses.create(model=MODEL, input="x")
    anonymous = running.openai("sk-sov-live-" + "x" * 40)
    with pytest.raises(openai.AuthenticationError):
        await anonymous.responses.retrieve(created.id)


async def test_input_items_query_is_checked(tenants):
    client, _ = tenants
    created = await client.responses.create(model=MODEL, input="x")
    for query, param in (({"limit": 0}, "limit"), ({"limit": "many"}, "limit"), ({"order": "up"}, "order")):
        with pytest.raises(openai.BadRequestError) as info:
            await client.get(f"/responses/{created.id}/input_items", cast_to=object, options={"params": query})
        assert info.value.body["param"] == param


def test_bad_ttl_fails_at_start_naming_the_field(mock):
    settings = make_settings(mock.url, pipeline=["responses"], units={"responses": {"store_ttl_seconds": 0}})
    with pytest.raises(ConfigError) as info:
        Gateway(settings)
    assert "units.responses.store_ttl_seconds" in str(info.value)
