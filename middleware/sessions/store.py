"""Redis layout and operations of server-side chat sessions (used by `middleware.sessions.unit`).

Per tenant, in the tenant's hash slot (``<prefix>:{<tenant>}:…``):

- ``session:<id>:meta``      HASH  id, created_at, updated_at (unix ms), message_count, tokens,
  system (the session's system message as JSON), title, title_state
- ``session:<id>:messages``  LIST  the stored non-system messages as JSON, oldest first
- ``sessions``               ZSET  session id -> updated_at (unix ms), for listing

Every write of a turn (append + trim + metadata + expiry + index) is one Lua script
(``proxy/lua/session_append.lua``), so concurrent turns on one session never lose each
other. A session and its index entry expire ``ttl_seconds`` after its last turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.store.store import Script, Store

SESSION_LOAD = Script.load("middleware.sessions", "session_load")
SESSION_APPEND = Script.load("middleware.sessions", "session_append")
SESSION_TITLE = Script.load("middleware.sessions", "session_title")
SESSION_DELETE = Script.load("middleware.sessions", "session_delete")


def encode_message(message: dict[str, Any]) -> str:
    """A message as stored: JSON with "role" first (the append script finds turn starts by that prefix)."""
    return orjson.dumps({"role": message.get("role"), **message}).decode()


@dataclass(slots=True)
class SessionView:
    """A stored session: its metadata and messages (system message first, if any)."""

    id: str
    title: str | None
    created_at: int
    updated_at: int
    message_count: int
    system: dict[str, Any] | None
    messages: list[dict[str, Any]]

    @classmethod
    def from_meta(cls, meta: dict[str, str], messages: list[dict[str, Any]] | None = None) -> SessionView:
        system = meta.get("system")
        return cls(
            id=meta["id"],
            title=meta.get("title") or None,
            created_at=int(meta["created_at"]) // 1000,
            updated_at=int(meta.get("updated_at") or meta["created_at"]) // 1000,
            message_count=int(meta.get("message_count") or 0),
            system=orjson.loads(system) if system else None,
            messages=messages or [],
        )

    def public(self, with_messages: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "session",
            "title": self.title,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "message_count": self.message_count,
        }
        if with_messages:
            out["messages"] = ([self.system] if self.system else []) + self.messages
        return out


class SessionStore:
    """Session operations on the gateway's store, with the unit's bounds."""

    def __init__(self, store: Store, ttl_seconds: int, max_messages: int, max_tokens: int) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.max_messages = max_messages
        self.max_tokens = max_tokens

    def _keys(self, tenant: str, session_id: str) -> tuple[str, str]:
        key = self.store.tenant_key
        return key(tenant, "session", session_id, "meta"), key(tenant, "session", session_id, "messages")

    def _index(self, tenant: str) -> str:
        return self.store.tenant_key(tenant, "sessions")

    async def load(self, tenant: str, session_id: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """The session's metadata (empty when new) and its stored non-system messages."""
        flat, rows = await self.store.run(SESSION_LOAD, list(self._keys(tenant, session_id)), [])
        meta = dict(zip(flat[::2], flat[1::2]))
        return meta, [orjson.loads(row) for row in rows]

    async def append(
        self, tenant: str, session_id: str, system: dict[str, Any] | None, messages: list[dict[str, Any]],
        read_created_at: str = "",
    ) -> tuple[int, bool] | None:
        """Store one finished turn atomically; returns (message_count, first stored turn).

        `read_created_at` is the ``created_at`` of the session as the turn
        loaded it ("" when it was new); None means that session is gone
        (deleted or expired while the turn ran) and nothing was stored.
        """
        args: list[Any] = [
            session_id,
            int(time.time() * 1000),
            self.ttl_seconds,
            self.max_messages,
            self.max_tokens,
            encode_message(system) if system is not None else "",
            read_created_at,
            *(encode_message(m) for m in messages),
        ]
        keys = [*self._keys(tenant, session_id), self._index(tenant)]
        count, first = await self.store.run(SESSION_APPEND, keys, args)
        if int(count) < 0:
            return None
        return int(count), first == 1

    async def set_title(self, tenant: str, session_id: str, title: str, state: str) -> bool:
        meta_key = self._keys(tenant, session_id)[0]
        return await self.store.run(SESSION_TITLE, [meta_key], [title, state]) == 1

    async def get(self, tenant: str, session_id: str) -> SessionView | None:
        meta, messages = await self.load(tenant, session_id)
        return SessionView.from_meta(meta, messages) if meta.get("id") else None

    async def delete(self, tenant: str, session_id: str) -> bool:
        keys = [*self._keys(tenant, session_id), self._index(tenant)]
        return await self.store.run(SESSION_DELETE, keys, [session_id]) == 1

    async def page(self, tenant: str, limit: int, after: str | None) -> tuple[list[SessionView], bool] | None:
        """Sessions by most recent turn first, `limit` after the id `after`; None if `after` is unknown."""
        redis = self.store.redis
        index = self._index(tenant)
        # Entries older than the expiry point at sessions Redis has already dropped.
        await redis.zremrangebyscore(index, "-inf", int(time.time() * 1000) - self.ttl_seconds * 1000)
        start = 0
        if after is not None:
            rank = await redis.zrevrank(index, after)
            if rank is None:
                return None
            start = rank + 1
        ids = await redis.zrevrange(index, start, start + limit)  # one extra tells has_more
        async with redis.pipeline(transaction=False) as pipe:
            for session_id in ids[:limit]:
                pipe.hgetall(self._keys(tenant, session_id)[0])
            metas = await pipe.execute()
        # A session can expire between the two reads; it is simply left out.
        return [SessionView.from_meta(m) for m in metas if m.get("id")], len(ids) > limit
