"""The hold scripts' trailing arguments: the key's budget, usage aggregates and events.

Kept apart from the metering unit so that what it adds to ``hold_reserve``,
``hold_settle`` and ``hold_release`` is one call each. The Lua side is
``budget.lua`` (admission and spending per key) and ``usage.lua`` (the hourly
and daily usage buckets, the key's spending, and webhook events), pasted into
the hold scripts; these arguments always come last, so they are found from
the end of KEYS/ARGV.

Budgets: a key with ``budget: {credits, period}`` is admitted while its
spending in the current period plus its open holds is below ``credits``, so
concurrent requests overshoot the budget by at most one hold. Periods are UTC
days (``d:YYYYMMDD``), UTC months (``m:YYYYMM``) or the key's lifetime
(``t``); spending starts from zero when the period changes, and a budget set
or changed mid-period starts from what the key was charged in it (the usage
day buckets, `Accounts.update_key`). The budget itself
travels with the key record, which the auth unit caches for
``units.auth.cache_seconds``: a changed budget applies within that bound.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.core.call import Principal
from proxy.core.settings import Settings
from proxy.store.accounts import budget_keys, period_id
from proxy.store.store import Store
from proxy.store.usage import settle_buckets


def budget_tail(store: Store, principal: Principal) -> tuple[list[str], list[Any]]:
    """hold_reserve's and hold_release's trailing KEYS and ARGV (none when the key has no budget)."""
    if principal.budget_credits is None:
        return [], []
    keys = list(budget_keys(store, principal.tenant, principal.key_id))
    return keys, ["budget", principal.budget_credits, period_id(principal.budget_period, time.time())]


def settle_tail(
    store: Store,
    settings: Settings,
    principal: Principal,
    model: str,
    input_tokens: int,
    output_tokens: int,
    created: int,
) -> tuple[list[str], list[Any]]:
    """hold_settle's trailing KEYS and ARGV (see usage.lua's settle_extras)."""
    buckets, expire_at = settle_buckets(store, principal.tenant, created, settings.usage.retention_days, settings.usage.daily_retention_days)
    keys = [*buckets, store.tenant_key(principal.tenant, "events"), *budget_keys(store, principal.tenant, principal.key_id)]
    budget = principal.budget_credits
    args: list[Any] = [
        "usage",
        principal.key_id,
        model,
        input_tokens,
        output_tokens,
        *expire_at,
        "1" if settings.webhooks.url else "",
        "" if budget is None else budget,
        period_id(principal.budget_period, created) if budget is not None else "",
        created,
    ]
    return keys, args
