"""The rate-limit unit: per-key requests per minute and concurrent requests, shared by all replicas.

A key's ``rpm`` and ``max_concurrency`` (set when the key is created) are
enforced by one Lua script per request (``ratelimit.lua``), so several
gateway replicas on one Redis share a single limit:

- ``rpm`` is a sliding window: at most ``rpm`` admitted requests in any 60
  seconds (a log of admission times; refused requests do not count). The
  ``Retry-After`` of a refusal is when the oldest admission leaves the window.
- ``max_concurrency`` counts requests in flight as leases that expire after
  ``concurrency_lease_seconds``, so a replica killed mid-request leaks no
  slot for longer than that. A slot is released when the reply is complete:
  at once for JSON, when the stream ends (completed, failed or cut) for SSE
  (under metering's ``on_disconnect: drain``, when the provider has finished
  for a client that left);
  a release the store cannot take (Redis restarting) is retried until the
  store answers or the lease has expired anyway.

Exceeded: 429 ``rate_limit_exceeded`` with ``Retry-After`` (whole seconds,
at least 1). Keys without limits cost no Redis round trip.

Every reply (429s and other errors too) of a key with an ``rpm`` carries the
headers OpenAI clients read: ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests`` and ``x-ratelimit-reset-requests`` (the
time until the oldest counted request leaves the window, in OpenAI's
``1s`` / ``6m0s`` form), reported by the same script call.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import Awaitable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import Field

from proxy.core.call import Call, Next, Reply
from proxy.core.errors import RateLimited, StoreUnavailable
from proxy.core.pipeline import Unit, UnitSettings
from proxy.core.streams import EventStream
from proxy.store.store import Script

RATELIMIT = Script.load("middleware.rate_limit", "ratelimit")
# A slot release the store did not take is retried: first pause, longest pause (seconds).
RETRY_FIRST, RETRY_MAX = 0.1, 5.0

log = structlog.get_logger("sovereign")

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway

REFUSALS = {
    1: "Rate limit reached: this API key may make {limit} requests per minute.",
    2: "Rate limit reached: this API key may have {limit} requests in flight at once.",
}


class RateLimitUnit(Unit):
    name = "rate_limit"

    class Settings(UnitSettings):
        concurrency_lease_seconds: float = Field(
            660.0,
            gt=0,
            description="Expiry of a concurrency slot: frees slots of a killed replica; keep it above the longest request (upstream total timeout).",
        )

    settings: Settings

    def __init__(self, settings: Settings, gateway: Gateway) -> None:
        super().__init__(settings, gateway)
        self._lease_ms = int(settings.concurrency_lease_seconds * 1000)
        # Members of the Redis sets: unique across replicas without a random call per request.
        self._instance = os.urandom(6).hex()
        self._seq = itertools.count().__next__  # `next` is the pipeline's parameter name here
        # Removals the store did not take, retried in the background (ended at shutdown).
        self._retrying: set[asyncio.Task[None]] = set()

    async def shutdown(self) -> None:
        # A store still down at exit: the slots free themselves when their leases expire.
        for task in list(self._retrying):
            task.cancel()
        await asyncio.gather(*self._retrying, return_exceptions=True)

    async def remove(self, keys: tuple[str, ...], member: str, until: float) -> None:
        """Take `member` out of `keys`; if the store is down, keep retrying in the background.

        One attempt was not enough: a release during a Redis restart left the slot
        taken for the whole lease (11 minutes by default), and a key with
        ``max_concurrency: 1`` got 429 all that time. The retries run until the
        store answers or the slot would have expired anyway (or the process exits).
        """
        try:
            await _zrem_all(self.gateway.store, keys, member)
        except StoreUnavailable:
            task = asyncio.get_running_loop().create_task(self._retry(keys, member, until))
            self._retrying.add(task)
            task.add_done_callback(self._retrying.discard)

    async def _retry(self, keys: tuple[str, ...], member: str, until: float) -> None:
        pause = RETRY_FIRST
        while True:
            if time.monotonic() + pause >= until:
                log.warning("rate_limit.release_failed", keys=list(keys), message="the slot frees itself when its lease expires")
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)
            try:
                await _zrem_all(self.gateway.store, keys, member)
                return
            except StoreUnavailable:
                continue

    async def __call__(self, call: Call, next: Next) -> Reply:
        principal = call.principal
        rpm = principal.rpm or 0
        concurrency = principal.max_concurrency or 0
        if not rpm and not concurrency:
            return await next(call)
        store = self.gateway.store
        tenant, key_id = principal.tenant, principal.key_id
        rpm_key = store.tenant_key(tenant, "rl", key_id, "rpm")
        lease_key = store.tenant_key(tenant, "rl", key_id, "inflight")
        member = f"{self._instance}:{self._seq():x}"
        try:
            refused, retry_ms, remaining, reset_ms = await store.run(
                RATELIMIT, [rpm_key, lease_key], [rpm, concurrency, self._lease_ms, member]
            )
        except StoreUnavailable:
            # The script may have run before the reply was lost: this request is
            # not served, so take back what it may have recorded (a no-op otherwise).
            self.gateway.spawn(self.remove((rpm_key, lease_key), member, self._expiry()), "rate_limit.forget")
            raise
        if rpm:
            headers = call.response_headers
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(remaining)
            headers["x-ratelimit-reset-requests"] = duration(reset_ms)
        if refused:
            limit = rpm if refused == 1 else concurrency
            raise RateLimited(REFUSALS[refused].format(limit=limit), retry_after=max(1, math.ceil(retry_ms / 1000)))
        if not concurrency:
            return await next(call)
        release = _Release(self, lease_key, member, self._expiry())
        try:
            reply = await next(call)
        except BaseException:
            await release()
            raise
        if reply.events is None:
            await release()
        else:
            reply.events = EventStream(reply.events, on_close=lambda _completed: release.after(call))
        return reply

    def _expiry(self) -> float:
        """When a slot taken now expires by itself (monotonic): retrying its removal past that is pointless."""
        return time.monotonic() + self.settings.concurrency_lease_seconds


def duration(ms: int) -> str:
    """Milliseconds the way OpenAI writes its reset headers (Go's duration format): ``20ms``, ``1.5s``, ``6m0s``."""
    ms = max(int(ms), 0)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


async def _zrem_all(store: Any, keys: tuple[str, ...], member: str) -> None:
    for key in keys:
        await store.redis.zrem(key, member)


class _Release:
    """Frees one concurrency slot, once, even when the request is being cancelled."""

    __slots__ = ("unit", "gateway", "key", "member", "until", "done")

    def __init__(self, unit: RateLimitUnit, key: str, member: str, until: float) -> None:
        self.unit = unit
        self.gateway = unit.gateway
        self.key = key
        self.member = member
        self.until = until
        self.done = False

    def after(self, call: Call) -> Awaitable[None] | None:
        """At the end of the client's stream: now, or, while metering still reads the provider for
        a client that left (`on_disconnect: drain`), once that ends; the provider is still at work."""
        drain = call.drain
        if drain is None or drain.done():
            return self()
        drain.add_done_callback(lambda _: self.gateway.spawn(self(), "rate_limit.release"))
        return None

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        # A background task survives the client's cancellation; shield lets us
        # still wait for it on the normal path (its first attempt; the retries
        # of a store that is down go on without the reply).
        task = self.gateway.spawn(self.unit.remove((self.key,), self.member, self.until), "rate_limit.release")
        with suppress(Exception):
            await asyncio.shield(task)
