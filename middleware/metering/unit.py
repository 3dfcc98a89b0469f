"""The metering unit: prepaid credits held before forwarding and charged from usage.

Per request, for a priced model:

1. Before forwarding, one Lua script (``hold_reserve``) sweeps expired holds
   and reserves a hold of ``cost(prompt estimate, output cap × n)`` if
   ``balance − reserved`` covers it — else 402 ``insufficient_credits``
   (``on_low_balance: clamp`` lowers the output cap to what the balance
   affords instead, when that is at least one token). The output cap is the
   client's ``max_completion_tokens``, else ``max_tokens``, else the model's
   ``max_output_tokens`` — which is then written into the request under the
   model's ``output_cap_param``, so the provider cannot produce more than was
   held.
   With ``speculative_hold`` (see `MeteringUnit._forward_speculatively`),
   the hold and the provider request go out together when the tenant's room
   at its last hold covered ``speculation_margin`` such holds; nothing is
   relayed before the hold is confirmed, and a refused hold cancels the
   provider request before answering 402.
2. Streams: unless the client asked for ``stream_options.include_usage``, the
   gateway asks for it and removes what that adds (the trailing usage chunk
   and the ``"usage": null`` field on every other chunk), so the client gets
   the stream it asked for. Untouched events are relayed as the same objects.
3. Once the reply is finished, one Lua script (``hold_settle``) releases the
   hold, charges the cost from the provider's reported usage and appends one
   ledger entry per request id (``req:<request id>``; a retried settlement
   changes nothing). Without reported usage (provider cut off, client gone,
   provider that reports none) the charge is an estimate, flagged
   ``usage_source: "estimated"``: the prompt estimate plus
   ``max(content chunks, ceil(characters / 4))`` output tokens, never above
   the cap. No output produced → no charge, the hold is released.

Settlement timing: the settlement write never delays the reply. JSON replies
and streams both settle in ``gateway.spawn`` once the reply is complete; until
it lands the request's hold still counts against the balance, so nothing can
be overspent in between. A write that meets a store error is never dropped:
the `SettlementQueue` (settlements.py) retries it until the store answers,
spools it to ``store.spool_dir`` at shutdown or past a memory bound, and
replays the spool later; the scripts are idempotent by request id, so no
retry or replay charges twice.

Checkpoints (sweeper.py): every ``checkpoint_seconds`` of a stream, the
output so far is recorded on its hold (deferred: it shares the next write; a
stream shorter than one interval writes nothing extra) and the hold's expiry
is pushed out. A hold whose replica died is charged at its checkpoint when it
expires (flagged ``estimated``, ``reason: "replica_lost"``), by whichever
replica's sweeper finds it first: a crash leaves at most one checkpoint
interval of output per stream unbilled.

Balance bound: the charge is the actual usage, so the balance can go below
zero only when the provider's prompt tokens exceed the prompt estimate — at
most ``(1 − 1/chars_per_token) × request bytes × input price`` per request
in flight (zero with ``chars_per_token: 1``). Output cannot exceed the hold:
the cap is always on the request. A provider that reports more than that
(more output tokens than the cap, more prompt tokens than the request has
bytes: no tokenizer makes a token of less than a byte) is charged at the
bound, logged (``metering.usage_clamped``) and counted
(``sovereign_usage_clamped_total``), so neither bound depends on the
provider's honesty.

Holds expire after ``hold_ttl_seconds`` (keep it above the upstreams'
``timeouts.total``, or a long stream's hold could expire before it settles):
a gateway killed mid-request leaves nothing reserved after that.

Credit leases (leases.py): a busy, well-funded tenant's JSON requests take
their holds from a slice this replica reserved once, and their charges are
written in batches every ``lease_flush_seconds`` — no store round trip per
request; near exhaustion, for streams and for keys with a budget, the
per-request scripts above apply.

Embeddings (``/v1/embeddings``) are metered on input alone: the hold is the
prompt estimate of the body, the charge the provider's ``usage.prompt_tokens``
(an estimate flagged as such when vectors came back without usage).

Free models (``free: true``): no hold and no charge; usage is still recorded
(a ledger entry with 0 credits, the access log and the token metrics).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

import orjson
import structlog
from pydantic import Field

from proxy.store.accounts import now_ms
from proxy.core.call import EMBEDDINGS, Call, Next, Reply, SSEEvent
from proxy.core.ids import unique_id
from proxy.core.errors import ApiError, CreditsExhausted, StoreUnavailable
from proxy.core.pipeline import Unit, UnitSettings
from proxy.core.streams import EventStream
from proxy.store.store import Script

from middleware.metering.budgets import budget_tail, settle_tail
from proxy.store.events import mark_pending
from middleware.metering.pricing import (
    CAP_FIELDS,
    TOKENS_PER_MESSAGE,
    Pricing,
    choices,
    embeddings_usage,
    output_cap,
    output_estimate,
    pricing_table,
    prompt_estimate,
)
from middleware.metering.leases import LEASE_FLUSH, Charge, Lease, LeaseBook
from middleware.metering.settlements import Settlement, SettlementQueue
from middleware.metering.sweeper import HoldSweeper, checkpoint_keys

HOLD_RESERVE = Script.load("middleware.metering", "hold_reserve")
HOLD_SETTLE = Script.load("middleware.metering", "hold_settle")
HOLD_RELEASE = Script.load("middleware.metering", "hold_release")
HOLD_CHECKPOINT = Script.load("middleware.metering", "hold_checkpoint")
# Where hold_settle takes now_ms among its arguments (ARGV[5]); it is added when the write is sent.
SETTLE_NOW_ARG = 4
# Where the scripts that can push webhook events report how many they pushed, in their answer.
PUSHED_AT = {HOLD_SETTLE.name: 2, LEASE_FLUSH.name: 4}

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway

log = structlog.get_logger("sovereign")

# How providers spell the `"usage": null` they add to chunks under include_usage.
USAGE_NULL_FIELDS = (b',"usage":null', b', "usage": null')
# Each cap field's other: the one a request must not also carry (see _cap_request).
OTHER_CAP_FIELD = {field: other for field in CAP_FIELDS for other in CAP_FIELDS if other != field}
# Delta fields whose text counts as produced output.
TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
# Most tenants whose room (speculative holds) and key names this process remembers.
TENANT_ENTRIES = 10_000


def key_budget_exceeded() -> CreditsExhausted:
    return CreditsExhausted("This API key has used up its budget for the current period.", code="key_budget_exceeded")


def insufficient_credits(needed: int, available: int) -> CreditsExhausted:
    return CreditsExhausted(
        f"Insufficient credits: this request needs {needed} credits but only {max(available, 0)} are available."
    )


@dataclass(slots=True)
class Room:
    """A tenant's credits as this process last saw them, for the speculative-hold check."""

    available: int = -1  # reported by the last hold script (-1: none answered yet)
    in_flight: int = 0  # credits of the holds sent and not yet answered (speculative or not)


@dataclass(slots=True)
class Ticket:
    """One metered request: what was held and how to settle it."""

    call: Call
    pricing: Pricing
    model: str  # public name (the forwarder rewrites the body's model)
    keys: list[str]  # tenant, holds, hold_amounts, ledger, ledger_ids
    hold_id: str  # "" when nothing is held (free model)
    hold: int
    prompt: int  # prompt-token estimate
    output_limit: int  # output tokens the hold covers (cap × n)
    input_limit: int  # prompt tokens the request can hold at most (a token is at least one byte)
    added_usage: bool  # the gateway turned on stream_options.include_usage
    done: bool = False
    # Trailing script arguments (middleware/metering/budgets.py): the key's
    # budget for reserve/release, usage aggregates and events for settle.
    budget: tuple[list[str], list[Any]] = ([], [])
    settle_tail: tuple[list[str], list[Any]] = ([], [])
    lease: Lease | None = None  # the hold was taken from this credit lease (leases.py), not reserved alone


class MeteringUnit(Unit):
    name = "metering"

    class Settings(UnitSettings):
        on_low_balance: Literal["reject", "clamp"] = Field(
            "reject", description="`reject`: 402 when the balance cannot cover the hold; `clamp`: lower the output cap to what it affords."
        )
        on_disconnect: Literal["cancel", "drain"] = Field(
            "cancel",
            description="Client gone mid-stream. `cancel`: stop the provider, charge an estimate of what was delivered; `drain`: read the provider to its end in the background and charge its reported usage.",
        )
        hold_ttl_seconds: float = Field(
            660.0, gt=0, description="Lifetime of a credit hold; must exceed the upstreams' `timeouts.total`."
        )
        chars_per_token: float = Field(
            3.0, ge=1, description="Request bytes per token of the prompt estimate (1 = strict upper bound)."
        )
        speculative_hold: bool = Field(
            True,
            description="Send the hold and the provider request together when the tenant's last seen room is at least `speculation_margin` holds; nothing is relayed before the hold is confirmed, and a refused hold cancels the provider request (402). Applies when metering is the last unit and `on_low_balance` is `reject`.",
        )
        speculation_margin: int = Field(
            4, ge=1, description="Room (in holds of this size) a tenant must have had at its last hold for the next one to be speculative."
        )
        checkpoint_seconds: float = Field(
            5.0,
            gt=0,
            description="Every this many seconds a stream's output so far is recorded on its hold; if the replica dies, the hold is charged at its checkpoint when it expires (at most this much output per stream goes unbilled).",
        )
        sweep_seconds: float = Field(
            10.0, gt=0, description="How often each replica settles expired holds of dead replicas at their checkpoints (within `hold_ttl_seconds` + this)."
        )
        settlement_retry_max_seconds: float = Field(
            5.0, gt=0, description="Longest pause between retries of settlements the store could not take (never given up)."
        )
        pending_settlements_limit: int = Field(
            10_000, ge=1, description="Without `store.spool_dir`: pending settlements kept in memory before a warning (with one they go to the spool at once)."
        )
        leases: bool = Field(
            True,
            description="Serve a busy, well-funded tenant's JSON requests from a credit lease (one hold reserved per slice, charges written in batches; see middleware/metering/leases.py). Needs a Redis store.",
        )
        lease_min_rate: float = Field(
            20.0, gt=0, description="JSON requests per second of a tenant on this replica before it takes a lease for it."
        )
        lease_holds: int = Field(64, ge=2, description="A lease's size, in holds of the request that started it.")
        lease_margin: int = Field(
            4, ge=1, description="A lease is taken (or topped up) only when the tenant has this many times its size (the increase) available."
        )
        lease_flush_seconds: float = Field(
            0.02,
            gt=0,
            le=1,
            description="How often leased charges are written (one script per tenant); a replica killed outright loses at most this much of its leased charges.",
        )
        lease_ttl_seconds: float = Field(
            30.0, gt=0, description="Expiry of a lease in the store, renewed by every flush: a dead replica's lease is free again after it."
        )
        lease_idle_seconds: float = Field(2.0, gt=0, description="A lease unused this long is given back.")

    settings: Settings

    def __init__(self, settings: Settings, gateway: Gateway) -> None:
        super().__init__(settings, gateway)
        self.store = gateway.store
        self.pricing = pricing_table(gateway.settings)
        # A model's configured defaults and system prompt join the body before it is sized (Call.apply_model_defaults).
        self.model_defaults = {
            name: (model.defaults, model.system_prompt)
            for name, model in gateway.settings.models.items()
            if model.defaults or model.system_prompt
        }
        self.hold_ms = int(settings.hold_ttl_seconds * 1000)
        # Tenant -> what this process last saw of its room (see _speculate).
        self._room: dict[str, Room] = {}
        self._tenant_keys: dict[str, list[str]] = {}
        self.settlements = SettlementQueue(
            self.store,
            [HOLD_SETTLE, HOLD_RELEASE, LEASE_FLUSH],
            on_count=lambda count: gateway.metrics.settlements_pending.set(count),
            spool_dir=gateway.settings.store.spool_dir,
            memory_limit=settings.pending_settlements_limit,
            retry_max_seconds=settings.settlement_retry_max_seconds,
            on_written=self._written,
        )
        self.sweeper = HoldSweeper(self.store, settings.sweep_seconds)
        # The embedded store has no round trip to save (and one process): no leases there.
        usage = gateway.settings.usage
        self.leases = (
            LeaseBook(
                self.store, settings, self.settlements, self._lease_keys,
                (usage.retention_days, usage.daily_retention_days), bool(gateway.settings.webhooks.url), self._written,
                self._count_charges, gateway.metrics.credit_leases.set,
            )
            if settings.leases and self.store.durable
            else None
        )
        # Decided at start-up, once the gateway knows what follows this unit (see startup).
        self._speculative = False
        longest = max((u.timeouts.total for u in gateway.settings.upstreams.values()), default=0.0)
        if settings.hold_ttl_seconds <= longest:
            log.warning(
                "metering.hold_ttl_short",
                hold_ttl_seconds=settings.hold_ttl_seconds,
                upstream_total_timeout=longest,
                message="a hold may expire before its request settles",
            )

    async def startup(self) -> None:
        # Only straight in front of the forwarder: a unit after metering would act
        # on the request (store a session turn, say) before its hold is confirmed.
        settings = self.settings
        self._speculative = (
            settings.speculative_hold and settings.on_low_balance == "reject" and self.gateway.forwards_directly(self)
        )
        if self.store.durable and self.gateway.settings.store.spool_dir is None:
            log.warning(
                "metering.no_spool",
                message="store.spool_dir is unset: settlements still pending at exit (a Redis outage) are lost",
            )
        self.settlements.start()
        self.sweeper.start()
        if self.leases is not None:
            self.leases.start()

    async def shutdown(self) -> None:
        await self.sweeper.close()
        if self.leases is not None:
            await self.leases.close()  # its last batches may still need the settlement queue
        await self.settlements.close()

    async def drain(self) -> None:
        if self.leases is not None:
            await self.leases.give_back_all()

    def readiness(self) -> list[str]:
        return ["settlements_pending"] if self.settlements.count else []

    # -- request path ------------------------------------------------------
    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        # A plain function that sizes the call and returns the coroutine that
        # serves it: one coroutine frame per request (see Unit.__call__).
        model = call.model
        pricing = self.pricing.get(model) if isinstance(model, str) else None
        if pricing is None:
            return next(call)  # the forwarder answers unknown models
        if self.model_defaults and model in self.model_defaults:
            call.apply_model_defaults(*self.model_defaults[model])
        stream = call.stream
        ticket = self._size(call, model, pricing, stream)
        hold = 0 if pricing.free else pricing.cost(ticket.prompt, ticket.output_limit)
        book = self.leases
        if hold and book is not None and not stream and not ticket.budget[0]:
            return self._leased(call, next, ticket, hold, book)
        return self._metered(call, next, ticket, hold)

    async def _metered(self, call: Call, next: Next, ticket: Ticket, hold: int) -> Reply:
        """A request with a hold of its own (or none: a free model): reserved before, settled after."""
        try:
            if hold and self._speculate(call.principal.tenant, hold):
                reply = await self._forward_speculatively(call, next, ticket, hold)
            else:
                if hold:  # else free, or a zero price: nothing to hold
                    await self._hold(ticket, hold)
                reply = await next(call)
        except Exception:
            await self._release(ticket)
            raise
        except BaseException:
            # Cancelled (client gone before the provider answered): no waiting here.
            self.gateway.spawn(self._release(ticket), "metering.release")
            raise
        if reply.events is not None:
            reply.events = StreamMeter(self, ticket).wrap(reply.events)
            return reply
        if reply.status != 200:
            await self._release(ticket)
            return reply
        usage, reported, chars = _reply_usage(call, reply)
        # Off the critical path: the reply does not wait for the ledger write,
        # and shutdown waits for it (gateway.drain), so it is never lost.
        write = self._settle(ticket, usage, reported, 0, chars, inline=False)
        if write is not None:
            self.gateway.spawn(write, "metering.settle")
        return reply

    async def _leased(self, call: Call, next: Next, ticket: Ticket, hold: int, book: LeaseBook) -> Reply:
        """A JSON request whose hold comes from the tenant's lease: no store round trip before or after.

        The lease is taken here, in the coroutine, not by `__call__`: a
        coroutine that never runs (a task cancelled before its first step)
        then takes nothing it could not give back. Without a usable lease the
        request holds on its own.
        """
        lease = book.take(call.principal.tenant, hold)
        if lease is None:
            return await self._metered(call, next, ticket, hold)
        ticket.lease, ticket.hold = lease, hold
        # The charge's marker: tells apart requests that reuse a client-supplied request id.
        ticket.hold_id = unique_id(f"{call.request_id}:", 32)
        call.response_headers["x-sovereign-credits-remaining"] = str(book.remaining(lease))
        try:
            reply = await next(call)
        except BaseException:
            book.give_back(lease, hold)
            ticket.done = True
            raise
        if reply.status != 200 or reply.events is not None:
            book.give_back(lease, hold)  # (a stream cannot answer a JSON call)
            ticket.done = True
            return reply
        usage, reported, chars = _reply_usage(call, reply)
        write = self._settle(ticket, usage, reported, 0, chars, inline=False)  # the charge joins the lease's next batch
        if write is not None:
            await write  # (nothing produced: the hold goes back to the lease, no I/O either)
        return reply

    def _size(self, call: Call, model: str, pricing: Pricing, stream: bool) -> Ticket:
        """Estimate the prompt, put the output cap on the request and ask for usage."""
        body = call.body
        size = len(call.body_bytes())  # the original bytes when no unit changed the body
        if call.endpoint == EMBEDDINGS:  # no output: the hold covers the input alone
            prompt = prompt_estimate(size, 0, self.settings.chars_per_token)
            return Ticket(call, pricing, model, self._keys(call.principal.tenant), "", 0, prompt, 0, size, False)
        messages = body.get("messages")
        count = len(messages) if isinstance(messages, list) else 0
        prompt = prompt_estimate(size, count, self.settings.chars_per_token)
        n = choices(body)
        cap = output_cap(body)
        if cap is None:
            cap = pricing.max_output_tokens
        if not pricing.free:
            _cap_request(call, pricing.output_cap_param, cap)
        added_usage = False
        if stream:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                call.set("stream_options", {**(options if isinstance(options, dict) else {}), "include_usage": True})
                added_usage = True
        # The strict bound, prompt_estimate at one byte a token: a token is at least one byte.
        input_limit = size + TOKENS_PER_MESSAGE * count
        ticket = Ticket(call, pricing, model, self._keys(call.principal.tenant), "", 0, prompt, cap * n, input_limit, added_usage)
        if call.principal.budget_credits is not None:  # else the Ticket's default: no budget arguments
            ticket.budget = budget_tail(self.store, call.principal)
        return ticket

    def _lease_keys(self, tenant: str) -> list[str]:
        """lease_flush's first keys: the credit keys and the tenant's events."""
        return [*self._keys(tenant), self.store.tenant_key(tenant, "events")]

    def _keys(self, tenant: str) -> list[str]:
        """The tenant's credit keys (tenant, holds, hold_amounts, ledger, ledger_ids), built once."""
        keys = self._tenant_keys.get(tenant)
        if keys is None:
            if len(self._tenant_keys) >= TENANT_ENTRIES:
                self._tenant_keys.clear()
            k = self.store.tenant_key
            keys = self._tenant_keys[tenant] = [
                k(tenant, "tenant"), k(tenant, "holds"), k(tenant, "hold_amounts"), k(tenant, "ledger"), k(tenant, "ledger_ids")
            ]
        return keys

    async def _hold(self, ticket: Ticket, hold: int) -> None:
        """Reserve the hold (or, under `clamp`, a smaller one); 402 when the balance cannot cover it."""
        call, pricing = ticket.call, ticket.pricing
        # Set before the round trip, so a request cancelled meanwhile still
        # releases its hold (a no-op if the script never ran). The suffix tells
        # apart requests reusing a client-supplied request id; the PRNG (not
        # urandom) because it needs to be unique, not secret.
        ticket.hold_id = hold_id = unique_id(f"{call.request_id}:", 32)
        try:
            status, available = await self._reserve(ticket, hold_id, hold)
            if status == 0 and self.settings.on_low_balance == "clamp":
                n = choices(call.body)
                affordable = min(pricing.affordable_output(ticket.prompt, n, available), ticket.output_limit // n)
                if affordable >= 1:
                    _cap_request(call, pricing.output_cap_param, affordable)
                    hold = pricing.cost(ticket.prompt, affordable * n)
                    ticket.output_limit = affordable * n
                    status, available = await self._reserve(ticket, hold_id, hold)
            if status == -2:
                raise key_budget_exceeded()
            if status != 1:
                raise insufficient_credits(hold, available)
        except Exception:
            ticket.hold_id = ""  # nothing held (a store error already scheduled its own release)
            raise
        ticket.hold = hold
        self.gateway.metrics.holds_open.inc()
        if self.leases is not None and not call.stream and not ticket.budget[0]:
            self.leases.note(call.principal.tenant, hold, available)

    # -- speculative holds -------------------------------------------------------
    def _speculate(self, tenant: str, hold: int) -> bool:
        """True when this tenant's last seen room covers `speculation_margin` holds of this size.

        The room is what the last hold script reported as still available,
        less the holds still under way, so a burst of concurrent requests
        stops speculating as it eats into the margin; a refusal lowers it
        below one hold, so near exhaustion requests hold first.
        """
        if not self._speculative:
            return False
        room = self._room.get(tenant)
        # Every hold of this tenant still under way counts, not only the
        # speculative ones: a burst that arrives before the first answers
        # would otherwise speculate on room its own plain holds are taking.
        return room is not None and room.available - room.in_flight >= hold * self.settings.speculation_margin

    async def _forward_speculatively(self, call: Call, next: Next, ticket: Ticket, hold: int) -> Reply:
        """Send the provider request while the hold is being reserved.

        The hold's Redis round trip overlaps the provider's time to its first
        byte instead of preceding it. Nothing reaches the client before the
        hold is confirmed: a refused hold (or a store error) cancels the
        provider request, whose connection is closed, and answers 402 (503).
        """
        forward = asyncio.ensure_future(next(call))
        try:
            await self._hold(ticket, hold)
        except BaseException:
            await _abandon(forward)
            raise
        try:
            return await forward
        except BaseException:
            # Cancelled (client gone) in the very iteration the forward finished:
            # its reply would be dropped with the provider connection still open.
            await _abandon(forward)
            raise

    async def _written(self, settlement: Settlement, result: Any) -> None:
        """A settle script or a lease batch that pushed webhook events marks its tenant for delivery."""
        pushed = PUSHED_AT.get(settlement.script)
        if pushed is not None and isinstance(result, list) and len(result) > pushed and result[pushed]:
            try:
                await mark_pending(self.store, settlement.tenant)
            except StoreUnavailable:
                pass  # the housekeeping sweep finds the tenant's events anyway

    async def _reserve(self, ticket: Ticket, hold_id: str, hold: int) -> tuple[int, int]:
        now = now_ms()
        room = self._tenant_room(ticket.call.principal.tenant) if self._speculative else None
        if room is not None:
            room.in_flight += hold  # (a Room dropped meanwhile is simply forgotten)
        try:
            status, available = await self.store.run(
                HOLD_RESERVE, ticket.keys[:3] + ticket.budget[0], [hold_id, hold, now, now + self.hold_ms, *ticket.budget[1]]
            )
        except StoreUnavailable:
            self._room.clear()  # no speculation until the store answers again
            # The script may have run before the connection broke: drop the
            # hold (a no-op if it never got there; kept until the store answers), then 503.
            call = ticket.call
            release = Settlement(
                HOLD_RELEASE.name, ticket.keys[:3] + ticket.budget[0], [hold_id, *ticket.budget[1]],
                call.request_id, call.principal.tenant, 0,
            )
            self.gateway.spawn(self.settlements.write(release), "metering.release")
            raise
        finally:
            if room is not None:
                room.in_flight -= hold
        status, available = int(status), int(available)
        if status == 1:
            ticket.call.response_headers["x-sovereign-credits-remaining"] = str(available)
        if room is not None:
            # What the script reported, for the next speculative-hold check; a
            # refusal reports less than one hold, so the next ones hold first.
            room.available = available
        return status, available

    def _tenant_room(self, tenant: str) -> Room:
        room = self._room.get(tenant)
        if room is None:
            if len(self._room) >= TENANT_ENTRIES:
                self._room.clear()  # bounded; an evicted tenant's next hold is simply not speculative
            room = self._room[tenant] = Room()
        return room

    # -- settlement ----------------------------------------------------------
    def _settle(
        self, ticket: Ticket, usage: Any, reported: tuple[int, int, int] | None, chunks: int, chars: int, inline: bool
    ) -> Coroutine[Any, Any, None] | None:
        """Work out the charge and fill the call's usage fields now; the store write it needs, for the caller to run.

        Now, because the access log line and the metrics read those fields as
        soon as the reply is out, before a spawned write would run. None when
        nothing is left to write (already settled, or a leased charge, which
        joins the lease's next batch). `reported` is `_reported(usage)`, which
        the caller has already worked out.
        """
        if ticket.done:
            return None
        ticket.done = True
        call, pricing = ticket.call, ticket.pricing
        if reported is not None:
            source = "reported"
            input_tokens, output_tokens, cached = reported
            call.usage = usage
            if output_tokens > ticket.output_limit or input_tokens > ticket.input_limit:
                input_tokens, output_tokens = self._clamped(ticket, input_tokens, output_tokens)
        elif chunks or chars:
            source = "estimated"
            input_tokens, cached = ticket.prompt, 0
            output_tokens = min(output_estimate(chunks, chars), ticket.output_limit)
            call.usage = {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            }
        else:
            return self._release(ticket, inline)  # nothing produced: nothing charged
        cost = pricing.cost(input_tokens, output_tokens, cached)
        call.credits, call.usage_source = cost, source
        created = int(time.time())
        if ticket.lease is None:  # leased charges are counted by the batch (_count_charges)
            self._count(ticket.model, source, input_tokens, output_tokens, cost)
            ticket.settle_tail = settle_tail(self.store, self.gateway.settings, call.principal, ticket.model, input_tokens, output_tokens, created)
        entry = orjson.dumps(
            {
                "type": "charge",
                "request_id": call.request_id,
                "key_id": call.principal.key_id,
                "model": ticket.model,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "credits": -cost,
                "usage_source": source,
                "kind": call.ledger_kind,
                "created_at": created,
            }
        ).decode()
        if ticket.lease is not None:
            principal = call.principal
            charge = Charge(ticket.hold_id, f"req:{call.request_id}", cost, entry, f"{principal.key_id}|{ticket.model}|",
                            input_tokens, output_tokens, created, ticket.model, source)
            assert self.leases is not None  # (the ticket took its hold from a lease)
            self.leases.charge(ticket.lease, ticket.hold, charge)
            return None
        args = [ticket.hold_id, cost, f"req:{call.request_id}", entry]
        return self._write(ticket, HOLD_SETTLE, ticket.keys, args, cost, inline)

    def _clamped(self, ticket: Ticket, input_tokens: int, output_tokens: int) -> tuple[int, int]:
        """Reported tokens beyond what the request could use, brought to that bound (see the module docstring)."""
        call, metrics = ticket.call, self.gateway.metrics
        log.warning(
            "metering.usage_clamped", request_id=call.request_id, upstream=call.upstream, model=ticket.model,
            reported_input=input_tokens, input_limit=ticket.input_limit,
            reported_output=output_tokens, output_limit=ticket.output_limit,
        )
        if output_tokens > ticket.output_limit:
            metrics.child(metrics.usage_clamped, "output", ticket.model).inc()
        if input_tokens > ticket.input_limit:
            metrics.child(metrics.usage_clamped, "input", ticket.model).inc()
        return min(input_tokens, ticket.input_limit), min(output_tokens, ticket.output_limit)

    def _count(self, model: str, source: str, input_tokens: int, output_tokens: int, cost: int) -> None:
        metrics = self.gateway.metrics
        metrics.child(metrics.tokens, "input", model).inc(input_tokens)
        metrics.child(metrics.tokens, "output", model).inc(output_tokens)
        metrics.child(metrics.credits, model, source).inc(cost)

    def _count_charges(self, charges: list[Charge]) -> None:
        """A lease batch's token and credit metrics, summed per model and usage source (a few metric calls per batch)."""
        self.gateway.metrics.leased_charges.inc(len(charges))
        sums: dict[tuple[str, str], list[int]] = {}
        for charge in charges:
            group = charge.model, charge.source
            totals = sums.get(group)
            if totals is None:
                sums[group] = [charge.input_tokens, charge.output_tokens, charge.credits]
            else:
                totals[0] += charge.input_tokens
                totals[1] += charge.output_tokens
                totals[2] += charge.credits
        for (model, source), (input_tokens, output_tokens, cost) in sums.items():
            self._count(model, source, input_tokens, output_tokens, cost)

    async def _release(self, ticket: Ticket, inline: bool = True) -> None:
        ticket.done = True
        if ticket.lease is not None:
            assert self.leases is not None  # (the ticket took its hold from a lease)
            self.leases.give_back(ticket.lease, ticket.hold)
            return
        if ticket.hold_id:
            await self._write(ticket, HOLD_RELEASE, ticket.keys[:3], [ticket.hold_id], 0, inline)

    async def _write(self, ticket: Ticket, script: Script, keys: list[str], args: list[Any], cost: int, inline: bool) -> None:
        """Hand a settlement script to the queue: written now, or kept and retried until the store answers.

        Not `inline` (background writes: the reply is already on its way): the
        write may wait a moment to share the next hold's (see script_client).
        """
        call = ticket.call
        if script is HOLD_SETTLE:  # the usage buckets and events ride along (see budgets.settle_tail)
            keys, args = keys + ticket.settle_tail[0], args + ticket.settle_tail[1]
        else:  # a release gives the key's budget hold back too
            keys, args = keys + ticket.budget[0], args + ticket.budget[1]
        settlement = Settlement(
            script.name, keys, args, call.request_id, call.principal.tenant, cost,
            now_at=SETTLE_NOW_ARG if script is HOLD_SETTLE else None,  # the settle script sweeps expired holds with it
            done=self.gateway.metrics.holds_open.dec if ticket.hold else None,  # only reserved holds count as open
        )
        await self.settlements.write(settlement, deferred=not inline)

    # -- charges beside a request's provider call (agent mode's priced tool calls) ------
    async def hold_extra(self, call: Call, hold_id: str, amount: int, seconds: float) -> int:
        """Reserve `amount` for a charge of `call` other than its provider call, for `seconds`.

        The hold script's status: 1 held, 0 the balance cannot cover it, -2 the
        key's budget is used up (the key's budget counts it like a request's hold).
        """
        principal = call.principal
        budget_keys, budget_args = budget_tail(self.store, principal)
        now = now_ms()
        status, _available = await self.store.run(
            HOLD_RESERVE, self._keys(principal.tenant)[:3] + budget_keys,
            [hold_id, amount, now, now + int(seconds * 1000), *budget_args],
        )
        return int(status)

    async def settle_extra(self, call: Call, hold_id: str, cost: int, entry: dict[str, Any]) -> None:
        """Charge `cost` for what `hold_extra` reserved, or release it when `cost` is 0.

        `entry` is the ledger entry without its id (a `created_at` and a `model`
        in it). It goes through the settlement queue like a request's charge
        (retried, spooled, replayed) and, like it, adds to the usage
        aggregates, the key's budget spending and the tenant's events.
        """
        principal = call.principal
        keys = self._keys(principal.tenant)
        if not cost:
            budget_keys, budget_args = budget_tail(self.store, principal)
            settlement = Settlement(HOLD_RELEASE.name, keys[:3] + budget_keys, [hold_id, *budget_args],
                                    call.request_id, principal.tenant, 0)
        else:
            tail_keys, tail_args = settle_tail(self.store, self.gateway.settings, principal, entry["model"], 0, 0, entry["created_at"])
            args = [hold_id, cost, f"req:{call.request_id}:{hold_id}", orjson.dumps(entry).decode(), *tail_args]
            settlement = Settlement(HOLD_SETTLE.name, keys + tail_keys, args, call.request_id, principal.tenant, cost,
                                    now_at=SETTLE_NOW_ARG)
        await self.settlements.write(settlement, deferred=True)

    # -- checkpoints -------------------------------------------------------
    async def checkpoint(self, ticket: Ticket, chunks: int, chars: int) -> None:
        """Record the output so far on the hold, with the entry to charge if this process dies before settling."""
        call, pricing = ticket.call, ticket.pricing
        output_tokens = min(output_estimate(chunks, chars), ticket.output_limit)
        cost = pricing.cost(ticket.prompt, output_tokens)
        created = int(time.time())
        # What a settlement adds besides the charge (usage, the key's budget, events), for the sweeper to add too.
        tail_keys, tail_args = settle_tail(self.store, self.gateway.settings, call.principal, ticket.model, ticket.prompt, output_tokens, created)
        entry = orjson.dumps(
            {
                "type": "charge",
                "request_id": call.request_id,
                "key_id": call.principal.key_id,
                "model": ticket.model,
                "input_tokens": ticket.prompt,
                "output_tokens": output_tokens,
                "credits": -cost,
                "usage_source": "estimated",
                "estimated": True,
                "reason": "replica_lost",
                "kind": call.ledger_kind,
                "created_at": created,
            }
        ).decode()
        tenant = call.principal.tenant
        keys = checkpoint_keys(self.store, tenant)
        expires = now_ms() + self.hold_ms
        tail = orjson.dumps({"k": tail_keys, "a": tail_args}).decode()
        args = [ticket.hold_id, cost, f"req:{call.request_id}", entry, expires, tail]
        # Both deferred: they go out together with the next write on the connection.
        results: tuple[Any, ...] = await asyncio.gather(
            self.store.run(HOLD_CHECKPOINT, [keys[1], keys[2], keys[5], keys[6], keys[7]], args, deferred=True),
            self.sweeper.register(tenant, ticket.hold_id, expires),
            return_exceptions=True,
        )
        # 0 (the hold is gone: settled meanwhile) and a store outage are expected;
        # a missed checkpoint only widens what a crash could leave unbilled.
        for outcome in results:
            if isinstance(outcome, BaseException) and not isinstance(outcome, StoreUnavailable):
                log.error("metering.checkpoint_failed", request_id=call.request_id, error=repr(outcome))


class StreamMeter:
    """What metering watches on a chat stream: output and usage per event, one settlement at the end.

    The stream itself is an `EventStream` (`wrap`): every event passes `observe`;
    however the stream ends (finished, failed, closed by the client, or dropped
    before its first event) `closed` settles once. Under `on_disconnect: drain`
    each provider read runs shielded (the handler's cancellation must not reach
    the provider connection) and a client that leaves hands the rest of the
    stream to `abandoned`, which reads it to its end for the exact usage.
    """

    __slots__ = ("unit", "ticket", "usage", "chunks", "chars", "next_checkpoint", "checkpointing")

    def __init__(self, unit: MeteringUnit, ticket: Ticket) -> None:
        self.unit = unit
        self.ticket = ticket
        self.usage: Any = None
        self.chunks = 0  # events that carried output
        self.chars = 0  # characters of output
        # No write at all for a stream shorter than one checkpoint interval.
        interval = unit.settings.checkpoint_seconds
        self.next_checkpoint = time.monotonic() + interval if ticket.hold else math.inf
        self.checkpointing: asyncio.Task[None] | None = None

    def wrap(self, events: AsyncIterator[SSEEvent]) -> EventStream:
        drain = self.unit.settings.on_disconnect == "drain"
        return EventStream(
            events,
            observe=self._observe,
            on_close=self.closed,
            shield_reads=drain,
            on_abandon=self.abandoned if drain else None,
        )

    def closed(self, completed: bool) -> None:
        """Finished, failed mid-stream (the relay reports it) or cut by the client: settle what was produced."""
        write = self._charge()
        if write is not None:
            self.unit.gateway.spawn(write, "metering.settle")

    def abandoned(self, rest: AsyncIterator[SSEEvent]) -> None:
        self.ticket.call.drain = self.unit.gateway.spawn(self._drain(rest), "metering.drain")

    async def _drain(self, rest: AsyncIterator[SSEEvent]) -> None:
        """Read the provider to its end (delivering nothing) for the exact usage."""
        try:
            async for event in rest:
                self._observe(event)
        except ApiError:
            pass  # cut off: the estimate from what was produced applies
        finally:
            await rest.aclose()  # type: ignore[attr-defined]  # an async generator (EventStream._resume)
            write = self._charge()
            if write is not None:
                await write

    def _charge(self) -> Coroutine[Any, Any, None] | None:
        return self.unit._settle(self.ticket, self.usage, _reported(self.usage), self.chunks, self.chars, inline=False)

    def _checkpoint(self) -> None:
        """Record the output so far on the hold, in the background (one checkpoint in flight at a time)."""
        self.next_checkpoint = time.monotonic() + self.unit.settings.checkpoint_seconds
        if self.ticket.done or (self.checkpointing is not None and not self.checkpointing.done()):
            return
        self.checkpointing = self.unit.gateway.spawn(
            self.unit.checkpoint(self.ticket, self.chunks, self.chars), "metering.checkpoint"
        )

    def _observe(self, event: SSEEvent) -> SSEEvent | None:
        """Count output and pick up usage; returns the event to relay, or None to drop it."""
        obj = event.json()
        if type(obj) is not dict:
            return event  # [DONE], comments
        choices_ = obj.get("choices")
        if choices_:
            chars = _output_chars(choices_, "delta")
            if chars:
                self.chunks += 1
                self.chars += chars
                if time.monotonic() >= self.next_checkpoint:
                    self._checkpoint()
        if "usage" not in obj:
            return event
        usage = obj["usage"]
        if usage is not None:
            self.usage = usage
        if not self.ticket.added_usage:
            return event
        # The client did not ask for usage: give back the chunk it would have got.
        if not choices_:
            return None  # the extra usage chunk
        rest = dict(obj)
        del rest["usage"]
        for field in USAGE_NULL_FIELDS:
            # Cutting the field out of the provider's bytes gives exactly what it
            # sends without include_usage, and costs no re-serialisation.
            if event.raw.find(field) != -1:  # (not `in`: see proxy/upstream/router.py, Upstream.redact)
                return SSEEvent.with_json(event.raw.replace(field, b"", 1), rest)
        return SSEEvent.from_json(rest)


async def _abandon(forward: asyncio.Future[Reply]) -> None:
    """Cancel a speculative provider request; close its reply if it already came back."""
    if not forward.done():
        forward.cancel()
        # Let the cancellation land (it closes the provider connection); the
        # caller's own cancellation still wins if it comes meanwhile.
        await asyncio.wait({forward})
    if forward.cancelled() or forward.exception() is not None:
        return
    reply = forward.result()
    if reply.events is not None:
        await reply.events.aclose()  # type: ignore[attr-defined]  # Reply.events is typed AsyncIterator; every stream is an async generator or has aclose


def _reply_usage(call: Call, reply: Reply) -> tuple[Any, tuple[int, int, int] | None, int]:
    """A JSON reply's usage, its tokens (`_reported`) and how much output it carries
    (characters; embeddings: 1 when vectors came back)."""
    body = reply.json()
    if not isinstance(body, dict):
        return None, None, 0
    if call.endpoint == EMBEDDINGS:
        # Input only: the provider's prompt tokens, else (vectors but no usage) the estimate.
        usage = embeddings_usage(body.get("usage"))
        return usage, _reported(usage), 1 if body.get("data") else 0
    usage = body.get("usage")
    reported = _reported(usage)
    # The output is only counted for the estimate, when the provider reported no usable usage.
    return usage, reported, 0 if reported is not None else _output_chars(body.get("choices"), "message")


def _cap_request(call: Call, field: str, cap: int) -> None:
    """Send the held cap in the one field this provider reads, and no other cap field.

    Otherwise a client could send `max_completion_tokens: 1` (which sizes the
    hold) to a provider that only reads `max_tokens`, and get unbounded output.
    """
    body = call.body
    other = OTHER_CAP_FIELD[field]
    if other not in body and type(body.get(field)) is int and body[field] == cap:
        return  # already exactly right: keep the original bytes
    capped = dict(body)
    capped.pop(other, None)
    capped[field] = cap
    call.replace_body(capped)


def _output_chars(choices_: Any, part: str) -> int:
    """Characters of output in every choice's `part` ("message" in JSON, "delta" in chunks)."""
    total = 0
    for choice in choices_ if isinstance(choices_, list) else ():
        content = choice.get(part) if isinstance(choice, dict) else None
        if isinstance(content, dict):
            total += _text_chars(content)
    return total


def _text_chars(part: dict[str, Any]) -> int:
    total = 0
    for field in TEXT_FIELDS:
        value = part.get(field)
        if isinstance(value, str):
            total += len(value)
    calls = part.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                total += sum(len(v) for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
    return total


def _reported(usage: Any) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) tokens from a provider's usage, or None when unusable."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return prompt, completion, cached if type(cached) is int else 0
