"""Where webhook events wait for delivery (the delivery itself is proxy/admin/webhooks.py).

A script that detects an event (a settlement crossing a tenant's
``low_balance_threshold`` or using up a key's budget, a top-up) pushes it onto
the tenant's ``events`` LIST in the same atomic step (``lua/events.lua``), so
an event exists exactly when its cause was written, on Redis Cluster too
(one slot per script). The caller then adds the tenant to the global
``webhook_pending`` SET, which tells the delivering replica where to look; a
process that dies between the two leaves the event in its list, where the
deliverer's periodic sweep over all tenants (``tenants`` SET) finds it.

Gateways with ``webhooks.url`` say so in the store (``webhooks_on``, renewed
while they run), so a process without the webhook settings (the CLI, given
only the store's URL) still records the events its writes cause.
"""

from __future__ import annotations

from proxy.store.store import Store


def events_key(store: Store, tenant: str) -> str:
    return store.tenant_key(tenant, "events")


def pending_key(store: Store) -> str:
    return store.global_key("webhook_pending")


def tenants_key(store: Store) -> str:
    """Every tenant id (written at creation; the console's list and the events sweep read it)."""
    return store.global_key("tenants")


async def mark_pending(store: Store, tenant: str) -> None:
    await store.redis.sadd(pending_key(store), tenant)


# How long the "webhooks on" marker outlives the last gateway that renewed it.
WEBHOOKS_ON_SECONDS = 3600


async def announce_webhooks(store: Store) -> None:
    """Mark that a gateway delivers webhooks (called at start and then every few minutes)."""
    await store.redis.set(store.global_key("webhooks_on"), "1", ex=WEBHOOKS_ON_SECONDS)


async def webhooks_on(store: Store) -> bool:
    """Whether a gateway delivering webhooks has run within the last hour."""
    return bool(await store.redis.exists(store.global_key("webhooks_on")))
