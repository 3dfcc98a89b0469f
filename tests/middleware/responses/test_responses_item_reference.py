"""`item_reference` inputs: items of the tenant's stored responses, by id.

The Vercel AI SDK (store: true) sends `{"type": "item_reference", "id": "rs_…"}`
for the earlier turn's reasoning and function calls instead of the items
themselves. Runs on the real Redis and on the embedded store, with the auth
unit in front so the references resolve per tenant, and the validation unit,
which must let references through.
"""

from __future__ import annotations

import openai
import pytest

from proxy.store.accounts import Accounts
from tests.support import make_settings

MODEL = "sovereign-alpha"
TTL = 3600
TOOL = {"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture
async def running(mock, gateway_factory, store_url, redis_prefix):
    settings = make_settings(mock.url, store_url=store_url, prefix=redis_prefix, pipeline=["auth", "validation", "responses"],
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


async def first_turn(client) -> openai.types.responses.Response:
    """A stored response with a reasoning item and a function call, as a reasoning provider gives."""
    return await client.responses.create(model=MODEL, input="weather in Paris?", tools=[TOOL],
                                         extra_headers={"x-mock-reasoning-chunks": "2"})


async def test_references_replace_the_items_they_name(tenants, mock):
    client, _ = tenants
    first = await first_turn(client)
    reasoning, call = first.output
    assert (reasoning.type, call.type) == ("reasoning", "function_call")

    # The Vercel AI SDK's second step: the user turn again, references, then the tool output.
    second = await client.responses.create(model=MODEL, tools=[TOOL], input=[
        {"role": "user", "content": "weather in Paris?"},
        {"type": "item_reference", "id": reasoning.id},
        {"type": "item_reference", "id": call.id},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
    ])
    assert mock.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "weather in Paris?"},
        # The reasoning item is resolved and, like a reasoning item sent in full, not sent on.
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
    ]
    assert second.output_text == 'Done: get_weather returned {"temp": 21} '
    # Input items list what was referenced, as the stored items.
    listed = [item async for item in client.responses.input_items.list(second.id, order="asc")]
    assert [(item.type, item.id) for item in listed][1] == ("function_call", call.id)

    # Every kind of stored item can be referenced: input messages, tool outputs, output messages.
    user_message, _, tool_output = (item.id for item in listed)
    answer = second.output[0]
    await client.responses.create(model=MODEL, input=[
        {"type": "item_reference", "id": user_message},
        {"type": "item_reference", "id": call.id},
        {"type": "item_reference", "id": tool_output},
        {"type": "item_reference", "id": answer.id},
        {"role": "user", "content": "thanks"},
    ])
    assert mock.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "thanks"},
    ]


async def test_streamed_response_items_can_be_referenced(tenants, mock):
    client, _ = tenants
    async with client.responses.stream(model=MODEL, input="weather?", tools=[TOOL]) as stream:
        final = await stream.get_final_response()
    call = final.output[0]
    await client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "weather?"},
        {"type": "item_reference", "id": call.id},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ])
    assert mock.requests[-1]["body"]["messages"][1]["tool_calls"][0]["id"] == call.call_id


async def test_unknown_and_foreign_ids_are_400_naming_the_input(tenants, mock):
    client_a, client_b = tenants
    first = await first_turn(client_a)
    requests_before = len(mock.requests)
    for client, item_id in ((client_a, "rs_" + "0" * 32), (client_b, first.output[0].id), (client_a, "bad id!")):
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(model=MODEL, input=[
                {"role": "user", "content": "hi"}, {"type": "item_reference", "id": item_id}])
        error = info.value.body
        assert error["code"] == "item_not_found" and error["param"] == "input[1].id"
        assert error["type"] == "invalid_request_error" and item_id in error["message"]
    for bad in ({"type": "item_reference", "id": 7}, {"type": "item_reference"}):
        with pytest.raises(openai.BadRequestError) as info:
            await client_a.responses.create(model=MODEL, input=[bad])
        assert info.value.body["param"] == "input[0].id"
    assert len(mock.requests) == requests_before  # nothing reached the provider
    # B's attempts changed nothing for A.
    await client_a.responses.create(model=MODEL, input=[{"type": "item_reference", "id": first.output[1].id}])


async def test_items_expire_and_go_with_their_response(running, tenants):
    client, _ = tenants
    first = await first_turn(client)
    store = running.gateway.store
    for item in first.output:
        ttl = await store.redis.ttl(store.tenant_key("tenant-a", "response_item", item.id))
        assert 0 < ttl <= TTL
    await client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": first.output[1].id}])
    assert info.value.body["code"] == "item_not_found"
    # store: false keeps no items either.
    unstored = await client.responses.create(model=MODEL, input="x", tools=[TOOL], store=False)
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": unstored.output[0].id}])


async def test_delete_keeps_items_a_later_response_reindexed(tenants, mock):
    """A client that re-sends an item in full (same id) makes the later response its owner."""
    client, _ = tenants
    first = await first_turn(client)
    call = first.output[1]
    second = await client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "id": call.id, "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "rain"},
    ])
    await client.responses.delete(first.id)
    third = await client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": call.id}])
    assert mock.requests[-1]["body"]["messages"][0]["tool_calls"][0]["id"] == call.call_id
    # The referencing response lists the item among its inputs, so it owns it too now.
    for response in (second, third):
        await client.responses.delete(response.id)
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": call.id}])


@pytest.mark.parametrize("resend", ["in_full", "by_reference"])
async def test_deleting_a_later_response_keeps_the_items_an_earlier_one_still_holds(running, tenants, mock, resend):
    """An item stays referenceable while a stored response carries it; it goes with the last one.

    Before, the later response (the Agents SDK re-sends items in full, the Vercel AI
    SDK by reference) took the index entry over, and deleting it broke references to
    the first response's items although that response was still stored.
    """
    client, _ = tenants
    first = await first_turn(client)
    call = first.output[1]
    again = ({"type": "function_call", "id": call.id, "call_id": call.call_id, "name": call.name, "arguments": call.arguments}
             if resend == "in_full" else {"type": "item_reference", "id": call.id})
    second = await client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "weather in Paris?"}, again,
        {"type": "function_call_output", "call_id": call.call_id, "output": "rain"},
    ])
    await client.responses.delete(second.id)
    third = await client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": call.id}])
    assert mock.requests[-1]["body"]["messages"][0]["tool_calls"][0]["id"] == call.call_id
    # An owner whose record is gone (expired) does not keep the entry once the others are deleted.
    store = running.gateway.store
    await store.redis.delete(store.tenant_key("tenant-a", "response", first.id))
    await client.responses.delete(third.id)
    assert await store.redis.get(store.tenant_key("tenant-a", "response_item", call.id)) is None
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": call.id}])
    assert info.value.body["code"] == "item_not_found"
