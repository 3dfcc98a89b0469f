"""The auth unit: API-key authentication, per-key model access, `GET /v1/credits` and `GET /v1/usage`.

Clients send ``Authorization: Bearer sk-sov-live-…`` (on the Anthropic
Messages routes also ``x-api-key: sk-sov-live-…``). The key is hashed
(SHA-256) and its record read from the store; a missing, malformed, unknown,
revoked or expired key gets 401 ``invalid_api_key`` without the key ever being
echoed. A small in-process cache (by hash, bounded) saves the Redis round trip
for ``cache_seconds``: a revoked key is refused by every replica within that
bound (default 5 s), an expired key at once (expiry is checked on every
request). Unknown keys are cached too, so a client retrying a bad key costs
no Redis traffic, and concurrent lookups of one key share a single read.

The unit provides the gateway's authenticator (`Unit.authenticator`), so routes outside the pipeline
(models, credits, sessions, stored responses) authenticate the same way, and
answers a model the key may not use exactly like an unknown model (404).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDictProxy
from pydantic import Field

from proxy.store.accounts import Accounts, KeyRecord, looks_like_key
from proxy.core.call import MESSAGES, MESSAGES_COUNT_TOKENS, Call, Next, Principal, Reply
from proxy.core.errors import AuthenticationFailed, model_not_found
from proxy.core.pipeline import Authenticator, Unit, UnitSettings
from proxy.web.usage import usage_response

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway

BEARER = "bearer "
API_KEY_HEADER = "x-api-key"
# Pipeline endpoints of protocols whose clients send the key as `x-api-key`.
API_KEY_ENDPOINTS = frozenset({MESSAGES, MESSAGES_COUNT_TOKENS})


def unauthorized(message: str) -> AuthenticationFailed:
    # OpenAI answers bad keys with type invalid_request_error, code invalid_api_key.
    return AuthenticationFailed(message)


MISSING = "Missing API key. Send it as `Authorization: Bearer sk-sov-live-…`."
MISSING_ANTHROPIC = "Missing API key. Send it as `x-api-key: sk-sov-live-…` or `Authorization: Bearer sk-sov-live-…`."
MALFORMED = "Malformed API key. Sovereign keys look like `sk-sov-live-` followed by at least 32 letters and digits."
INCORRECT = "Incorrect API key provided."
REVOKED = "This API key has been revoked."
EXPIRED = "This API key has expired."


def _token(headers: CIMultiDictProxy[str], api_key_header: bool) -> str:
    """The presented key (Bearer, else on the Anthropic routes `x-api-key`); 401 when there is none."""
    header = headers.get("Authorization")
    if not header and api_key_header and headers.get(API_KEY_HEADER):
        return headers[API_KEY_HEADER].strip()
    if not header or header[: len(BEARER)].lower() != BEARER:
        raise unauthorized(MISSING_ANTHROPIC if api_key_header else MISSING)
    return header[len(BEARER):].strip()


def _digest(token: str) -> str:
    # surrogateescape: aiohttp keeps non-UTF-8 header bytes as surrogates;
    # such a token is malformed (401), not a crash.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _checked(record: KeyRecord | None, principal: Principal | None) -> Principal:
    """The key's principal if the key is known, not revoked and not expired; else 401."""
    if record is None or principal is None:
        raise unauthorized(INCORRECT)
    if record.revoked_at is not None:
        raise unauthorized(REVOKED)
    if record.expires_at is not None and time.time() >= record.expires_at:
        raise unauthorized(EXPIRED)
    return principal


class AuthUnit(Unit):
    name = "auth"

    class Settings(UnitSettings):
        cache_seconds: float = Field(
            5.0, ge=0, description="How long a key lookup is reused in-process (0: no cache); bounds how late a revocation takes effect."
        )
        cache_entries: int = Field(10_000, ge=1, description="Most key lookups kept in the in-process cache.")

    settings: Settings

    def __init__(self, settings: Settings, gateway: Gateway) -> None:
        super().__init__(settings, gateway)
        self.accounts = Accounts(gateway.store)
        # sha256 hex -> (record or None when unknown, its principal, monotonic fetch time).
        # Insertion order is fetch order, so the first entry is always the oldest.
        self._cache: dict[str, tuple[KeyRecord | None, Principal | None, float]] = {}
        # Lookups under way, by digest (shared by concurrent requests).
        self._lookups: dict[str, asyncio.Future[tuple[KeyRecord | None, Principal | None]]] = {}

    def authenticator(self) -> Authenticator:
        return self.authenticate

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        # A plain function (see Unit.__call__): with the key's record cached, the
        # common case, the unit adds no coroutine frame to the request's await chain.
        token = _token(call.headers, call.endpoint in API_KEY_ENDPOINTS)
        digest = _digest(token)
        hit = self._fresh(digest)
        if hit is None:
            return self._look_up_then(call, next, token, digest)
        return self._admit(call, next, _checked(hit[0], hit[1]))

    async def _look_up_then(self, call: Call, next: Next, token: str, digest: str) -> Reply:
        return await self._admit(call, next, _checked(*await self._look_up(token, digest)))

    def _admit(self, call: Call, next: Next, principal: Principal) -> Awaitable[Reply]:
        call.principal = principal
        model = call.body.get("model")
        if isinstance(model, str) and not principal.may_use(model):
            raise model_not_found(model)
        return next(call)

    # -- authentication ------------------------------------------------------
    async def authenticate(self, headers: CIMultiDictProxy[str], api_key_header: bool = False) -> Principal:
        """The principal of the presented key; raises 401 `invalid_api_key` otherwise.

        With `api_key_header` (the Anthropic routes) the key may also come as
        ``x-api-key``, as the Anthropic SDKs send it; a Bearer header wins.
        """
        token = _token(headers, api_key_header)
        digest = _digest(token)
        hit = self._fresh(digest)
        if hit is not None:
            return _checked(hit[0], hit[1])
        return _checked(*await self._look_up(token, digest))

    def _fresh(self, digest: str) -> tuple[KeyRecord | None, Principal | None, float] | None:
        """The cached lookup of this key, if still within `cache_seconds`."""
        hit = self._cache.get(digest)
        return hit if hit is not None and time.monotonic() - hit[2] < self.settings.cache_seconds else None

    async def _look_up(self, token: str, digest: str) -> tuple[KeyRecord | None, Principal | None]:
        """The record of a key that is not in the cache (the caller looked)."""
        # Only well-formed keys are ever looked up, so a cached digest is one.
        if not looks_like_key(token):
            raise unauthorized(MALFORMED)
        return await self._record(digest)

    async def _record(self, digest: str) -> tuple[KeyRecord | None, Principal | None]:
        ttl = self.settings.cache_seconds
        now = time.monotonic()
        # Single flight: a burst of requests with the same uncached key shares
        # one Redis read instead of sending one each.
        pending = self._lookups.get(digest)
        if pending is None:
            pending = self._lookups[digest] = asyncio.ensure_future(self._fetch(digest, now if ttl > 0 else None))
            pending.add_done_callback(lambda _: self._lookups.pop(digest, None))
        return await asyncio.shield(pending)

    async def _fetch(self, digest: str, remember_at: float | None) -> tuple[KeyRecord | None, Principal | None]:
        record = await self.accounts.lookup_digest(digest)
        principal = record.principal() if record is not None else None
        if remember_at is not None:
            self._remember(digest, (record, principal, remember_at))
        return record, principal

    def _remember(self, digest: str, entry: tuple[KeyRecord | None, Principal | None, float]) -> None:
        cache = self._cache
        cache.pop(digest, None)  # re-insert at the end: insertion order stays fetch order
        while len(cache) >= self.settings.cache_entries:
            del cache[next(iter(cache))]
        cache[digest] = entry

    # -- GET /v1/credits -------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/credits", self.credits), web.get("/v1/usage", self.usage)]

    async def usage(self, request: web.Request) -> web.Response:
        """`GET /v1/usage`: the key's own tenant's usage (proxy/web/usage.py has the query)."""
        principal = await self.authenticate(request.headers)
        return await usage_response(self.gateway.store, principal.tenant, request.query)

    async def credits(self, request: web.Request) -> web.Response:
        principal = await self.authenticate(request.headers)
        tenant = await self.accounts.tenant(principal.tenant)
        budget = None
        if principal.budget_credits is not None:
            budget = {"credits": principal.budget_credits, "period": principal.budget_period, "spent": 0, "held": 0}
            record = await self.accounts.get_key(principal.key_id)
            if record is not None:
                budget.update(await self.accounts.key_spending(record))  # what is left of it, as the client wants to know
        body = {
            "object": "credits",
            "tenant": principal.tenant,
            "balance": tenant["balance"],
            "reserved": tenant["reserved"],
            "available": tenant["available"],
            "key": {
                "id": principal.key_id,
                "name": principal.name,
                "models": sorted(principal.models),
                "rpm": principal.rpm,
                "max_concurrency": principal.max_concurrency,
                "expires_at": int(principal.expires_at) if principal.expires_at else None,
                "budget": budget,
            },
        }
        return web.json_response(body)


__all__ = ["AuthUnit", "unauthorized"]
