"""Stored responses: one Redis hash per response, in the tenant's slot.

Key ``<prefix>:{<tenant>}:response:<id>`` with three fields, each a JSON
document, so every reader fetches only what it needs:

- ``response``: the Response object, served as is by ``GET /v1/responses/{id}``;
- ``input_items``: this request's input items (``…/input_items``);
- ``messages``: the whole conversation up to and including this response's
  output, as chat messages without instructions — a follow-up with
  ``previous_response_id`` reads this one field instead of walking the chain.

Every item of a stored response (its output items and its input items) is
also indexed for `item_reference` inputs: key
``<prefix>:{<tenant>}:response_item:<item id>`` holds ``"<owners> <item
JSON>"``, written by the same script as the hash and with the same expiry. A
reference is then one MGET for all ids of a request, without reading any
response. The owners are the stored responses that carry the item (a client
re-sends earlier output as input, and each such response renews the entry):
the hash's ``item_ids`` field lists the indexed ids, and a delete takes the
response off their owners, removing an entry only with its last stored owner.

Keys expire after the configured TTL (``store_ttl_seconds``). Tenants
are isolated by the key itself: another tenant's id is simply not found.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.store.store import Script, Store

RESPONSE_PUT = Script.load("middleware.responses", "response_put")
RESPONSE_DELETE = Script.load("middleware.responses", "response_delete")

# Ids the gateway hands out; anything else cannot exist, so it is not looked up.
RESPONSE_ID = re.compile(r"^resp_[A-Za-z0-9]{1,100}$")
# Item ids that are indexed and looked up: the gateway's own (`msg_…`, `fc_…`,
# `rs_…`) and any plain id a client gave its input items.
ITEM_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ResponseStore:
    """Reads and writes stored responses on the gateway's store."""

    def __init__(self, store: Store, ttl_seconds: int) -> None:
        self.store = store
        self.ttl = ttl_seconds

    def _key(self, tenant: str, response_id: str) -> str:
        return self.store.tenant_key(tenant, "response", response_id)

    def _item_key(self, tenant: str, item_id: str) -> str:
        return self.store.tenant_key(tenant, "response_item", item_id)

    async def put(
        self,
        tenant: str,
        response: dict[str, Any],
        raw: bytes,
        input_items: list[dict[str, Any]],
        messages: list[dict[str, Any]],
    ) -> None:
        """Store `response` (`raw`: its JSON, which the caller also sends) with its items and conversation."""
        # Input items first: an output item that reuses an input's id wins.
        items = {item["id"]: item for item in [*input_items, *response["output"]]
                 if isinstance(item.get("id"), str) and ITEM_ID.fullmatch(item["id"])}
        # One script rather than a MULTI/EXEC pipeline: the same atomicity, and a
        # small record takes the hot-path script client (a large one, redis-py's
        # pool: see Store.run).
        fields = [
            "response", raw,
            "input_items", orjson.dumps(input_items),
            "messages", orjson.dumps(messages),
            "item_ids", orjson.dumps(list(items)),
        ]
        owner = response["id"].encode() + b" "
        keys = [self._key(tenant, response["id"]), *(self._item_key(tenant, item_id) for item_id in items)]
        values = [owner + orjson.dumps(item) for item in items.values()]
        await self.store.run(RESPONSE_PUT, keys, [self.ttl, len(fields), *fields, *values])

    async def items(self, tenant: str, item_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored items among `item_ids` (one round trip), by id; unknown ids are absent."""
        wanted = [item_id for item_id in dict.fromkeys(item_ids) if ITEM_ID.fullmatch(item_id)]
        if not wanted:
            return {}
        values = await self.store.redis.mget([self._item_key(tenant, item_id) for item_id in wanted])
        found: dict[str, dict[str, Any]] = {}
        for item_id, value in zip(wanted, values, strict=True):
            if value is not None:
                found[item_id] = orjson.loads(value.split(" ", 1)[1])
        return found

    async def field(self, tenant: str, response_id: str, name: str) -> str | None:
        """One stored field (JSON text), or None for an unknown id."""
        if not RESPONSE_ID.fullmatch(response_id):
            return None
        return await self.store.redis.hget(self._key(tenant, response_id), name)

    async def messages(self, tenant: str, response_id: str) -> list[dict[str, Any]] | None:
        raw = await self.field(tenant, response_id, "messages")
        return None if raw is None else orjson.loads(raw)

    async def delete(self, tenant: str, response_id: str) -> bool:
        if not RESPONSE_ID.fullmatch(response_id):
            return False
        key = self._key(tenant, response_id)
        # Records written before the item index have no `item_ids`: nothing more to delete.
        item_ids = orjson.loads(await self.store.redis.hget(key, "item_ids") or "[]")
        item_keys = [self._item_key(tenant, item_id) for item_id in item_ids]
        # The entries' other owners, whose hashes the script checks (it may only touch keys it is given).
        entries = await self.store.redis.mget(item_keys) if item_keys else []
        others = sorted({
            owner for entry in entries if entry is not None
            for owner in entry.partition(" ")[0].split(",") if owner != response_id and RESPONSE_ID.fullmatch(owner)
        })
        keys = [key, *item_keys, *(self._key(tenant, owner) for owner in others)]
        return bool(await self.store.run(RESPONSE_DELETE, keys, [response_id, len(item_keys), *others]))
