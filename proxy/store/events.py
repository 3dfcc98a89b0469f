"""Where webhook events wait for delivery (the delivery itself is proxy/admin/webhooks.py).

A script that detects an event (a settlement crossing a tenant's
``low_balance_threshold`` or using up a key's budget, a top-up) pushes it onto
the tenant's ``events`` LIST in the same atomic step (``lua/events.lua``), so
an event exists exactly when its cause was written, on Redis Cluster too
(one slot per script). The caller then adds the tenant to the global
``webhook_pending`` SET, which tells the delivering replica where to look; a
process that dies between the two leaves the event in its list, where the
deliverer's periodic sweep over all tenants (``tenants`` SET) finds it.
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
