"""Credit leases: a busy tenant's holds served from a slice reserved once, its charges written in batches.

Without a lease every metered request costs two store round trips (hold,
settle). A replica that sees a tenant send at least ``lease_min_rate`` JSON
requests a second (keys without a budget, on a durable store) reserves a
*lease* for it: one hold of ``lease_holds`` × the request's hold, taken only
when the tenant has ``lease_margin`` times that much available. While the
lease lasts, that tenant's JSON requests on this replica take their holds from
it in memory, and their charges are collected and written every
``lease_flush_seconds`` by one `lease_flush` script, which also tops the lease
back up (under the same margin) and pushes its expiry out.

Why the credit invariants (DESIGN §5) still hold:

- **No overspend across replicas.** A lease is an ordinary hold in the store:
  every other replica's hold script counts it as reserved, and this replica
  never lets the holds it serves from it plus its unwritten charges exceed it.
  A tenant near exhaustion gets no lease (the margin) and a lease that cannot
  be topped up is given back, so its requests fall back to per-request holds.
- **Every charge exactly once.** A batch carries an id of its own, which the
  script records in ``ledger_ids``: a retried or replayed batch applies
  nothing twice (a batch is applied whole or not at all). The entry id stays
  ``req:<request id>`` (``#<marker>`` added for a reused client request id).
- **Nothing stuck.** A lease is a hold with an expiry (``lease_ttl_seconds``),
  renewed by every flush; a replica that dies leaves it to expire. A lease idle
  for ``lease_idle_seconds`` and every lease at shutdown are given back.
- **Nothing served goes unbilled.** A batch the store does not take goes to the
  `SettlementQueue` (retried, spooled, replayed), with the lease sized down to
  what is still in flight. A replica killed outright loses at most one flush
  interval of its leased charges (the lease's checkpoint is its last flush),
  the same bound as a stream's checkpoint interval.
- **Fail closed.** A lease is used only while its last flush is younger than
  ``lease_ttl_seconds`` / 2 and the last flush succeeded: when the store stops
  answering, requests go back to per-request holds, which answer 503.

Streams, keys with a budget and per-request holds under ``clamp`` keep the
per-request scripts (a stream's hold carries its checkpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy.core.errors import StoreUnavailable
from proxy.store.accounts import now_ms
from proxy.store.store import Script, Store
from proxy.store.usage import settle_buckets

from middleware.metering.settlements import Settlement, SettlementQueue

LEASE_FLUSH = Script.load("middleware.metering", "lease_flush")
# Where lease_flush takes now_ms (ARGV[2]), inserted when a queued batch is finally sent.
FLUSH_NOW_ARG = 1
# Charges written by one script call at most (a bigger batch is split).
BATCH_LIMIT = 512
# A lease grows to at most this many times its first size (the margin still applies).
LARGEST_SLICE = 16
# Most tenants whose request rate is tracked (the table is cleared beyond it).
TRACKED_TENANTS = 10_000

log = structlog.get_logger("sovereign")


@dataclass(slots=True)
class Charge:
    """One leased request's charge, as the flush script writes it."""

    marker: str  # unique per request: tells apart requests that reused a client request id
    entry_id: str  # "req:<request id>"
    credits: int
    entry: str  # the ledger entry JSON without "id"
    prefix: str  # "<key id>|<model>|": its fields in the usage buckets
    input_tokens: int
    output_tokens: int
    created: int  # unix seconds: picks its usage buckets
    model: str  # for the token and credit metrics
    source: str  # "reported" or "estimated"


@dataclass(slots=True)
class Lease:
    """A tenant's slice on this replica: what the store holds for it and what is taken from it."""

    tenant: str
    id: str
    slice: int  # the size it is topped up to (doubled, up to `largest`, when requests found it short)
    largest: int
    keys: list[str]  # tenant, holds, hold_amounts, ledger, ledger_ids, events
    size: int = 0  # credits the store holds for it, as of the last flush
    open: int = 0  # holds of requests in flight under it
    unwritten: int = 0  # charges not yet written (including a flush under way)
    available: int = 0  # the tenant's available credits after the last flush
    usable: bool = False  # acquired, topped up, and the store answered the last flush
    synced_at: float = 0.0  # monotonic time of the last flush the store took
    last_used: float = 0.0
    returning: bool = False  # being given back: no new holds
    short: bool = False  # a request found too little free since the last flush
    broken: bool = False  # the store failed a flush: serves nothing more, its batches go to the queue
    queued_size: int = 0  # broken: the size the store may still hold for it, until a queued batch shrinks it to 0
    charges: list[Charge] = field(default_factory=list)
    flushing: asyncio.Task[None] | None = None

    @property
    def free(self) -> int:
        return self.size - self.open - self.unwritten


class LeaseBook:
    """This replica's leases, by tenant, and the loop that writes their charges (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        settings: Any,  # MeteringUnit.Settings
        queue: SettlementQueue,
        tenant_keys: Callable[[str], list[str]],
        usage_retention: tuple[int, int],
        events: bool,
        on_written: Callable[[Settlement, Any], Awaitable[None]],
        on_charged: Callable[[list[Charge]], None],
        on_leases: Callable[[int], None],
    ) -> None:
        self.store = store
        self.settings = settings
        self.queue = queue
        self.tenant_keys = tenant_keys
        self.usage_retention = usage_retention
        self.events = events
        self.on_written = on_written  # told each written batch's answer (the unit marks a tenant whose events it pushed)
        self.on_charged = on_charged  # a batch handed to the store (the metrics)
        self.on_leases = on_leases  # told how many leases are held whenever that changes (the gauge)
        self.ttl_ms = int(settings.lease_ttl_seconds * 1000)
        self.stale_after = settings.lease_ttl_seconds / 2
        self.leases: dict[str, Lease] = {}
        self._rate: dict[str, list[float]] = {}  # tenant -> [window start, requests in it]
        self._instance = os.urandom(6).hex()
        self._seq = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """At exit: stop the loop, write every batch and give every lease back."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.give_back_all()

    async def give_back_all(self) -> None:
        """Write every batch now and give back every lease (to the settlement queue if the store is down).

        What is still in flight keeps its part of a lease until it settles; a
        busy tenant simply takes a new lease later.
        """
        for lease in list(self.leases.values()):
            lease.returning = True
            while True:
                if lease.flushing is not None and not lease.flushing.done():
                    with contextlib.suppress(Exception):
                        await lease.flushing  # one flush of a lease at a time
                    continue
                await self._start_flush(lease)
                if not lease.charges:
                    break

    # -- the request path --------------------------------------------------
    def take(self, tenant: str, hold: int) -> Lease | None:
        """Take `hold` from the tenant's lease, or None: hold per request instead."""
        lease = self.leases.get(tenant)
        if lease is None or not lease.usable or lease.returning:
            return None
        now = time.monotonic()
        if now - lease.synced_at > self.stale_after:
            return None  # the store has not taken a flush for too long: fail closed
        if lease.size - lease.open - lease.unwritten < hold:  # (`free`, inline: once per request)
            lease.short = True  # more concurrency than the slice covers: grow it
            self._wake.set()  # top it up soon
            return None
        lease.open += hold
        lease.last_used = now
        return lease

    def note(self, tenant: str, hold: int, available: int) -> None:
        """After a per-request hold: count the tenant's rate and lease for it once it is busy and well funded."""
        now = time.monotonic()
        window = self._rate.get(tenant)
        if window is None or now - window[0] >= 1.0:
            if len(self._rate) >= TRACKED_TENANTS:
                self._rate.clear()
            self._rate[tenant] = [now, 1.0]
            return
        window[1] += 1
        if window[1] < self.settings.lease_min_rate or tenant in self.leases or self._closing:
            return
        slice_ = hold * self.settings.lease_holds
        if available < slice_ * self.settings.lease_margin:
            return
        lease = Lease(tenant, f"lease:{self._instance}:{next(self._seq)}", slice_, slice_ * LARGEST_SLICE, self.tenant_keys(tenant))
        lease.last_used = now
        self.leases[tenant] = lease
        self.on_leases(len(self.leases))
        self._start_flush(lease)  # acquires it

    def give_back(self, lease: Lease, hold: int) -> None:
        """A leased request that produced nothing: its hold goes back to the lease."""
        lease.open -= hold

    def charge(self, lease: Lease, hold: int, charge: Charge) -> None:
        """A leased request's charge, written with the next flush."""
        lease.open -= hold
        lease.unwritten += charge.credits
        lease.charges.append(charge)
        if len(lease.charges) >= BATCH_LIMIT:
            self._start_flush(lease)

    def remaining(self, lease: Lease) -> int:
        """Credits the tenant has left as this replica knows it (the x-sovereign-credits-remaining header)."""
        remaining = lease.available + lease.size - lease.open - lease.unwritten  # (`free`, inline)
        return remaining if remaining > 0 else 0  # (per request: no max(), see Pricing.cost)

    # -- flushing ------------------------------------------------------------
    async def _run(self) -> None:
        interval = self.settings.lease_flush_seconds
        idle = self.settings.lease_idle_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                self._step(time.monotonic(), idle)
            except Exception as exc:  # the loop must outlive any one lease's trouble
                log.error("metering.lease_loop_failed", error=repr(exc))

    def _step(self, now: float, idle: float) -> None:
        """Start the flushes that are due: charges to write, a lease to top up, renew or give back."""
        for lease in list(self.leases.values()):
            if lease.broken:
                if lease.charges or (lease.open == 0 and lease.queued_size):
                    self._start_flush(lease)
                self._forget_if_done(lease)
                continue
            if not lease.returning and lease.open == 0 and now - lease.last_used > idle:
                lease.returning = True  # idle: give it back
            if lease.charges or lease.returning or lease.free < lease.slice // 2 or now - lease.synced_at > self.stale_after / 4:
                self._start_flush(lease)

    def _start_flush(self, lease: Lease) -> asyncio.Task[None]:
        """The lease's flush under way, or a new one (never two at once: their results would race)."""
        if lease.flushing is None or lease.flushing.done():
            lease.flushing = asyncio.get_running_loop().create_task(self._flush(lease))
        return lease.flushing

    async def _flush(self, lease: Lease) -> None:
        """One batch: the charges so far, and the lease resized (topped up, or sized down to what is in flight)."""
        charges, lease.charges = lease.charges[:BATCH_LIMIT], lease.charges[BATCH_LIMIT:]
        if lease.short and not lease.returning:
            lease.short = False
            lease.slice = min(lease.slice * 2, lease.largest)
        want = lease.open if lease.returning else lease.slice
        settlement = self._settlement(lease, charges, want)
        credits = settlement.credits
        if charges:
            self.on_charged(charges)
        if lease.broken:
            # The store failed a flush: what is left goes to the settlement queue, shrinking only.
            await self._hand_over(lease, settlement, charges)
            return
        try:
            result = await self.store.run(LEASE_FLUSH, settlement.keys, _with_now(settlement.args))
        except StoreUnavailable:
            # Never dropped: the queue retries it. From now on this lease serves no request.
            lease.broken, lease.usable, lease.returning = True, False, True
            lease.queued_size = max(lease.size, 1)
            await self._hand_over(lease, settlement, charges)
            return
        except Exception as exc:  # a script error: retrying cannot help
            log.error("metering.lease_flush_failed", tenant=lease.tenant, charges=len(charges), error=repr(exc))
            lease.unwritten -= credits
            lease.broken, lease.usable, lease.returning = True, False, True
            self._forget_if_done(lease)
            return
        status, size, available = int(result[0]), int(result[1]), int(result[2])
        lease.unwritten -= credits
        if status != 1:  # the tenant is gone
            lease.broken, lease.usable, lease.returning = True, False, True
            self._forget_if_done(lease)
            return
        lease.size, lease.available = size, available
        lease.synced_at = time.monotonic()
        await self.on_written(settlement, result)
        if not lease.returning:
            # A lease that cannot be topped up (the tenant nears exhaustion) is given back:
            # its requests hold one by one again.
            lease.usable = size >= want
            lease.returning = not lease.usable
        self._forget_if_done(lease)
        if lease.charges:
            self._start_flush(lease)

    async def _hand_over(self, lease: Lease, settlement: Settlement, charges: list[Charge]) -> None:
        """Queue a broken lease's batch to be retried until the store takes it.

        Sized to what is still in flight and never grown (margin 0): a batch
        written after the lease expired must not bring it back. Once nothing is
        in flight, one last batch sizes it to 0, so the store frees the slice as
        soon as it answers again rather than at its expiry.
        """
        if settlement.credits or charges or (lease.open == 0 and lease.queued_size):  # charges, or the last
            settlement.args[2], settlement.args[3] = lease.open, 0  # wanted size, margin (ARGV[4], ARGV[5])
            lease.queued_size = lease.open
            await self.queue.write(settlement)
        lease.unwritten -= settlement.credits
        self._forget_if_done(lease)

    def _forget_if_done(self, lease: Lease) -> None:
        """Drop a lease given back (or broken) once nothing is in flight under it and nothing is left to write."""
        if not lease.returning or lease.open or lease.charges or self.leases.get(lease.tenant) is not lease:
            return
        if lease.size == 0 or (lease.broken and not lease.queued_size):
            del self.leases[lease.tenant]
            self.on_leases(len(self.leases))

    def _settlement(self, lease: Lease, charges: list[Charge], want: int) -> Settlement:
        """The lease_flush call for `charges`, as the settlement queue would retry it."""
        keys = list(lease.keys)
        expire_at: list[int] = []
        bucket_index: dict[int, int] = {}  # hour start -> KEYS index (1-based) of its hour bucket
        fields: list[Any] = []
        hourly, daily = self.usage_retention
        credits = 0
        created = index = -1
        for charge in charges:
            if charge.created != created:  # (a batch's charges mostly share their second)
                created = charge.created
                hour = created - created % 3600
                index = bucket_index.get(hour, -1)
                if index == -1:
                    buckets, expires = settle_buckets(self.store, lease.tenant, created, hourly, daily)
                    index = bucket_index[hour] = len(keys) + 1
                    keys += buckets
                    expire_at += expires
            fields += (charge.marker, charge.entry_id, charge.credits, charge.entry, charge.prefix,
                       charge.input_tokens, charge.output_tokens, index)
            credits += charge.credits
        args: list[Any] = [
            lease.id, self.ttl_ms, want, self.settings.lease_margin, "1" if self.events else "",
            len(bucket_index), *expire_at, f"batch:{lease.id}:{next(self._seq)}", *fields,
        ]
        return Settlement(
            LEASE_FLUSH.name, keys, args, f"lease-batch:{lease.id}", lease.tenant, credits, now_at=FLUSH_NOW_ARG,
        )


def _with_now(args: list[Any]) -> list[Any]:
    return [args[0], now_ms(), *args[1:]]
