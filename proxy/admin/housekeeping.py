"""Background work that one replica at a time does: webhook delivery and ledger retention.

Every replica runs a `Housekeeper`; a lease in Redis (``housekeeping_lease``,
``webhooks.lease_seconds``, renewed on every step) makes one of them the
active one, and another takes over when it stops renewing (a crash, a
restart). Nothing here runs on a request's path: a slow or failing webhook
receiver delays only the next event.

Webhook delivery (events are recorded by the scripts, see proxy/store/events.py):

* The active replica reads the tenants in ``webhook_pending`` each
  ``webhooks.poll_seconds`` and delivers each tenant's events oldest first:
  a JSON POST to ``webhooks.url``, signed ``Sovereign-Signature:
  t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with webhooks.secret>``.
  An event leaves its list only after a 2xx answer, so it is delivered *at
  least once* (a replica that dies mid-delivery leaves it for the next one;
  receivers de-duplicate by the event's ``id``). One active replica means no
  storm of copies from many.
* A failed attempt (error, timeout, non-2xx) pauses that tenant's events for
  ``webhooks.retry_seconds``, doubling per failure up to
  ``webhooks.max_retry_seconds``; an event older than ``webhooks.max_age_seconds``
  is dropped with an error log. Order within a tenant is kept.
* Every minute the active replica also looks at every tenant's event list
  (``tenants`` SET), which finds events whose pending mark was lost (a
  process that died between the script and the mark).

Ledger retention: with ``ledger.retention_days`` set, the active replica folds
each tenant's older entries every ``ledger.fold_interval_seconds``
(`Accounts.fold_ledger`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING

import aiohttp
import orjson
import structlog

from proxy.store.accounts import Accounts
from proxy.store.events import WEBHOOKS_ON_SECONDS, announce_webhooks, events_key, pending_key, tenants_key
from proxy.core.errors import StoreUnavailable
from proxy.store.store import STORE_DOWN_ERRORS, Script

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway

LEASE = Script.load("proxy.store.lua", "lease")
SWEEP_SECONDS = 60.0
# How often each replica with webhooks renews the store's "webhooks on" marker.
ANNOUNCE_SECONDS = WEBHOOKS_ON_SECONDS / 12
STORE_DOWN: tuple[type[BaseException], ...] = (StoreUnavailable, *STORE_DOWN_ERRORS)
log = structlog.get_logger("sovereign")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Sovereign-Signature` header value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class Housekeeper:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store
        self.webhooks = gateway.settings.webhooks
        self.ledger = gateway.settings.ledger
        self.holder = secrets.token_hex(8)
        self.task: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.failures: dict[str, int] = {}  # tenant -> consecutive failed attempts
        self.paused_until: dict[str, float] = {}
        self.next_sweep = 0.0
        self.next_fold = 0.0
        self.next_announce = 0.0

    @property
    def needed(self) -> bool:
        return bool(self.webhooks.url) or self.ledger.retention_days is not None

    async def start(self) -> None:
        if self.needed and self.task is None:
            self.task = asyncio.create_task(self._run(), name="housekeeping")

    async def _announce(self, now: float) -> None:
        """Keep the store's "webhooks on" marker alive, so the CLI records events too (proxy/store/events.py)."""
        if self.webhooks.url and now >= self.next_announce:
            self.next_announce = now + ANNOUNCE_SECONDS
            await announce_webhooks(self.store)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -- the loop -----------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._announce(time.monotonic())
                if await self._lease():
                    await self.step()
            except asyncio.CancelledError:
                raise
            except STORE_DOWN:
                pass  # the store is down: try again at the next poll
            except Exception as exc:  # a bug must not stop the loop for good
                log.error("housekeeping.failed", error=repr(exc))
            await asyncio.sleep(self.webhooks.poll_seconds)

    async def _lease(self) -> bool:
        key = self.store.global_key("housekeeping_lease")
        return bool(await self.store.run(LEASE, [key], [self.holder, int(self.webhooks.lease_seconds * 1000)]))

    async def step(self) -> None:
        """One pass of the active replica's work."""
        now = time.monotonic()
        if self.webhooks.url:
            tenants = set(await self.store.redis.smembers(pending_key(self.store)))
            if now >= self.next_sweep:
                self.next_sweep = now + SWEEP_SECONDS
                tenants |= await self._tenants_with_events()
            await asyncio.gather(*(self._deliver_tenant(t) for t in sorted(tenants) if self.paused_until.get(t, 0) <= now))
        if self.ledger.retention_days is not None and now >= self.next_fold:
            self.next_fold = now + self.ledger.fold_interval_seconds
            await self._fold_all(time.time() - self.ledger.retention_days * 86400)

    async def _tenants_with_events(self) -> set[str]:
        tenants = sorted(await self.store.redis.smembers(tenants_key(self.store)))
        found: set[str] = set()
        for i in range(0, len(tenants), 500):
            batch = tenants[i : i + 500]
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for tenant in batch:
                    pipe.llen(events_key(self.store, tenant))
                lengths = await pipe.execute()
            found.update(t for t, n in zip(batch, lengths, strict=True) if n)
        return found

    async def _fold_all(self, before: float) -> None:
        accounts = Accounts(self.store)
        for tenant in sorted(await self.store.redis.smembers(tenants_key(self.store))):
            if not await self._lease():
                return  # another replica took over
            folded = await accounts.fold_ledger(tenant, before)
            if folded:
                log.info("ledger.folded", tenant=tenant, entries=folded)

    # -- webhooks -------------------------------------------------------------
    async def _deliver_tenant(self, tenant: str) -> None:
        redis, key = self.store.redis, events_key(self.store, tenant)
        await self._report_dropped(tenant)
        while True:
            raw = await redis.lindex(key, -1)  # the oldest
            if raw is None:
                await redis.srem(pending_key(self.store), tenant)
                # An event pushed after the LINDEX marks the tenant again after its
                # script returns; one pushed before the SREM is seen here.
                if await redis.llen(key):
                    await redis.sadd(pending_key(self.store), tenant)
                return
            if not await self._lease():
                return
            if self._expired(raw):
                log.error("webhooks.dropped", tenant=tenant, event=raw[:200], message="undelivered for webhooks.max_age_seconds")
            elif not await self._send(raw.encode()):
                failures = self.failures[tenant] = self.failures.get(tenant, 0) + 1
                pause = min(self.webhooks.max_retry_seconds, self.webhooks.retry_seconds * 2 ** (failures - 1))
                self.paused_until[tenant] = time.monotonic() + pause
                return
            self.failures.pop(tenant, None)
            self.paused_until.pop(tenant, None)
            await redis.lrem(key, -1, raw)

    async def _report_dropped(self, tenant: str) -> None:
        """Log the events the 10,000 cap dropped (a receiver down for long) since the last report."""
        tenant_key = self.store.tenant_key(tenant, "tenant")
        dropped = int(await self.store.redis.hget(tenant_key, "events_dropped") or 0)
        if dropped:
            await self.store.redis.hincrby(tenant_key, "events_dropped", -dropped)
            log.error("webhooks.dropped", tenant=tenant, count=dropped,
                      message="more than 10000 events waited: the oldest were dropped undelivered")

    def _expired(self, raw: str) -> bool:
        try:
            created = float(orjson.loads(raw).get("created_at") or 0)
        except (orjson.JSONDecodeError, AttributeError):
            return True  # not an event we wrote
        return time.time() - created > self.webhooks.max_age_seconds

    async def _send(self, body: bytes) -> bool:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.webhooks.timeout_seconds))
        secret = self.webhooks.secret.get_secret_value() if self.webhooks.secret else ""
        headers = {"Content-Type": "application/json", "User-Agent": "sovereign-webhooks", "Sovereign-Signature": signature(secret, int(time.time()), body)}
        assert self.webhooks.url is not None
        try:
            async with self.session.post(self.webhooks.url, data=body, headers=headers, allow_redirects=False) as resp:
                ok = 200 <= resp.status < 300
                if not ok:
                    log.warning("webhooks.refused", status=resp.status)
                return ok
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("webhooks.unreachable", error=repr(exc))
            return False


__all__ = ["Housekeeper", "signature"]
