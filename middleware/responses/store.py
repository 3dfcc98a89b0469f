"""Stored responses: one Redis hash per response, in the tenant's slot.

Key ``<prefix>:{<tenant>}:response:<id>`` with three fields, each a JSON
document, so every reader fetches only what it needs:

- ``response``: the Response object, served as is by ``GET /v1/responses/{id}``;
- ``input_items``: this request's input items (``…/input_items``);
- ``messages``: the whole conversation up to and including this response's
  output, as chat messages without instructions — a follow-up with
  ``previous_response_id`` reads this one field instead of walking the chain.

The key expires after the configured TTL (``store_ttl_seconds``). Tenants
are isolated by the key itself: another tenant's id is simply not found.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.store.store import Script, Store

RESPONSE_PUT = Script.load("middleware.responses", "response_put")

# Ids the gateway hands out; anything else cannot exist, so it is not looked up.
RESPONSE_ID = re.compile(r"^resp_[A-Za-z0-9]{1,100}$")


class ResponseStore:
    """Reads and writes stored responses on the gateway's store."""

    def __init__(self, store: Store, ttl_seconds: int) -> None:
        self.store = store
        self.ttl = ttl_seconds

    def _key(self, tenant: str, response_id: str) -> str:
        return self.store.tenant_key(tenant, "response", response_id)

    async def put(
        self,
        tenant: str,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        messages: list[dict[str, Any]],
    ) -> None:
        # One script rather than a MULTI/EXEC pipeline: the same atomicity, and a
        # small record takes the hot-path script client (a large one, redis-py's
        # pool: see Store.run).
        fields = [
            "response", orjson.dumps(response),
            "input_items", orjson.dumps(input_items),
            "messages", orjson.dumps(messages),
        ]
        await self.store.run(RESPONSE_PUT, [self._key(tenant, response["id"])], [self.ttl, *fields])

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
        return bool(await self.store.redis.delete(self._key(tenant, response_id)))
