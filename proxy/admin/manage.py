"""`sovereign tenants …` and `sovereign keys …`: account management from the shell.

The commands run against the configured store (``store.url`` from
``--config``, ``SOVEREIGN_CONFIG`` or ``SOVEREIGN_STORE_URL``), through the
same `Accounts` operations and request validation as the admin API. Output is
an aligned table, or the admin API's JSON with ``--json``. Failures print one
line to stderr and exit 1 (2 for a bad configuration). A ``memory://`` store
is private to this process, so the commands warn that nothing they do will be
seen by a running gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import orjson
from redis.exceptions import RedisError

from proxy.store.accounts import Accounts
from proxy.admin.bodies import CreditTopUp, KeyCreate, KeyUpdate, TenantCreate, TenantUpdate
from proxy.admin.api import (
    create_key_from,
    new_idempotency_key,
    parse_body,
    update_key_from,
)
from proxy.core.errors import ApiError, StoreUnavailable, invalid_request
from proxy.core.settings import Settings, masked_url
from proxy.store.events import webhooks_on
from proxy.store.store import Store

LoadSettings = Callable[[argparse.Namespace], Settings]
# An operation returns (the JSON answer, the same as readable text).
Operation = Callable[[Accounts, Settings, argparse.Namespace], Awaitable[tuple[Any, str]]]


# -- output --------------------------------------------------------------------
def _when(value: Any) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromtimestamp(float(value), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):  # a time no calendar prints (stored before expiries were bounded)
        return str(value)


def _cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers aligned right."""
    cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int) for row in rows) and bool(rows) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def pairs(items: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in items)


def _tenant_text(t: dict[str, Any]) -> str:
    return pairs(
        [
            ("tenant", t["id"]),
            ("balance", t["balance"]),
            ("reserved", t["reserved"]),
            ("available", t["available"]),
            ("low-balance threshold", t.get("low_balance_threshold") if t.get("low_balance_threshold") is not None else "-"),
            ("created", _when(t["created_at"])),
        ]
    )


def _budget(budget: dict[str, Any] | None) -> str:
    if not budget:
        return "-"
    spent = f"{budget['spent']}/" if "spent" in budget else ""
    return f"{spent}{budget['credits']} per {budget['period']}" if budget["period"] != "total" else f"{spent}{budget['credits']} total"


def _key_row(k: dict[str, Any]) -> list[Any]:
    status = "revoked" if k["revoked_at"] else "active"
    return [
        k["id"], k["name"], status, k["models"] or "all", k["rpm"], k["max_concurrency"], _budget(k.get("budget")),
        _when(k["created_at"]), _when(k["expires_at"]),
    ]


KEY_HEADER = ["ID", "NAME", "STATUS", "MODELS", "RPM", "CONCURRENCY", "BUDGET", "CREATED", "EXPIRES"]


def _budget_arg(args: argparse.Namespace) -> dict[str, Any] | None:
    """The budget the flags give; without --budget-period, the API's default (total, or the key's own on update)."""
    if args.budget is None:
        if args.budget_period is not None:  # it used to be ignored without a word
            raise invalid_request("--budget-period needs --budget (the credits of the period).", param="budget_period")
        return None
    return {"credits": args.budget, **({"period": args.budget_period} if args.budget_period else {})}


# -- operations ------------------------------------------------------------------
async def tenants_create(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    data: dict[str, Any] = {"id": args.id, "credits": args.credits}
    if args.low_balance_threshold is not None:
        data["low_balance_threshold"] = args.low_balance_threshold
    body = parse_body(TenantCreate, data)
    tenant = await accounts.create_tenant(body.id, body.credits, body.low_balance_threshold)
    return tenant, _tenant_text(tenant)


async def tenants_update(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    threshold = None if args.clear_low_balance_threshold else args.low_balance_threshold
    body = parse_body(TenantUpdate, {"low_balance_threshold": threshold})
    tenant = await accounts.update_tenant(args.id, body.low_balance_threshold)
    return tenant, _tenant_text(tenant)


async def tenants_list(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    """Every tenant, by id (read page by page, as GET /admin/tenants serves them)."""
    tenants: list[dict[str, Any]] = []
    after = None
    while True:
        page, more = await accounts.list_tenants(after=after)
        tenants += page
        if not more or not page:
            break
        after = page[-1]["id"]
    rows = [[t["id"], t["balance"], t["reserved"], t["available"], _when(t["created_at"])] for t in tenants]
    return {"object": "list", "data": tenants}, table(["ID", "BALANCE", "RESERVED", "AVAILABLE", "CREATED"], rows)


async def tenants_show(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    tenant = await accounts.tenant(args.id)
    return tenant, _tenant_text(tenant)


async def tenants_topup(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    body = parse_body(CreditTopUp, {"amount": args.amount, "idempotency_key": args.idempotency_key})
    key = body.idempotency_key
    if key is None:
        key = new_idempotency_key()
        print(f"idempotency key: {key} (repeat with --idempotency-key {key} to retry safely)", file=sys.stderr)
    applied, tenant = await accounts.add_credits(args.id, body.amount, key)
    note = f"added {body.amount} credits" if applied else "already applied with this idempotency key; nothing changed"
    return tenant, note + "\n" + _tenant_text(tenant)


async def tenants_ledger(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    if not 1 <= args.limit <= 1000:
        raise ApiError(400, "--limit is an integer from 1 to 1000.", param="limit")
    entries = await accounts.ledger(args.id, args.limit)
    rows = [[_when(e.get("created_at")), e.get("type"), e.get("credits"), e.get("balance_after"), e.get("id")] for e in entries]
    return {"object": "list", "data": entries}, table(["TIME", "TYPE", "CREDITS", "BALANCE", "ENTRY"], rows)


async def keys_create(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    data: dict[str, Any] = {"tenant": args.tenant, "name": args.name}
    if args.models is not None:
        data["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for field in ("rpm", "max_concurrency", "expires_at"):
        if getattr(args, field) is not None:
            data[field] = getattr(args, field)
    budget = _budget_arg(args)
    if budget is not None:
        data["budget"] = budget
    plaintext, record = await create_key_from(accounts, parse_body(KeyCreate, data), settings)
    public = record.public()
    text = f"{plaintext}\n\nThis key is shown once; store it now.\n\n" + (table(KEY_HEADER, [_key_row(public)]) if not args.json else "")
    return {**public, "key": plaintext}, text


async def keys_update(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    data: dict[str, Any] = {}
    if args.name is not None:
        data["name"] = args.name
    if args.models is not None:
        data["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for field in ("rpm", "max_concurrency", "expires_at"):
        if getattr(args, field) is not None:
            data[field] = getattr(args, field) or None  # 0 clears the limit
    budget = _budget_arg(args)
    if budget is not None:
        data["budget"] = budget
    if args.clear_budget:
        data["budget"] = None
    record = await update_key_from(accounts, args.key_id, parse_body(KeyUpdate, data), settings)
    public = await accounts.public_key(record)
    return public, table(KEY_HEADER, [_key_row(public)])


async def keys_list(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    records = [await accounts.public_key(r) for r in await accounts.list_keys(args.tenant)]
    return {"object": "list", "data": records}, table(KEY_HEADER, [_key_row(r) for r in records])


async def keys_revoke(accounts: Accounts, settings: Settings, args: argparse.Namespace) -> tuple[Any, str]:
    public = (await accounts.revoke_key(args.key_id)).public()
    return public, f"revoked {public['id']} (tenant {public['tenant']})"


# -- plumbing ----------------------------------------------------------------------
async def _run(settings: Settings, op: Operation, args: argparse.Namespace) -> tuple[Any, str]:
    store = Store(settings.store)
    try:
        await store.connect()
        # The CLI rarely has the webhook settings: a gateway that delivers them says so in the store.
        events = bool(settings.webhooks.url) or await webhooks_on(store)
        return await op(Accounts(store, events=events), settings, args)
    finally:
        await store.close()


def _command(op: Operation, load: LoadSettings) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = load(args)
        if settings.store.url.startswith("memory://"):
            print(
                "sovereign: warning: the store is memory:// — this command's changes live only in this process and are "
                "lost when it exits; set SOVEREIGN_STORE_URL (or store.url) to the gateway's Redis",
                file=sys.stderr,
            )
        try:
            data, text = asyncio.run(_run(settings, op, args))
        except StoreUnavailable as exc:
            print(f"sovereign: cannot reach the store at {masked_url(settings.store.url)}: {exc.__cause__ or exc}", file=sys.stderr)
            return 1
        except ApiError as error:
            where = f" (param: {error.param})" if error.param else ""
            print(f"sovereign: {error.message}{where}", file=sys.stderr)
            return 1
        except RedisError as exc:  # answered, but refused us: wrong password, ACL, a replica
            print(f"sovereign: cannot use the store at {masked_url(settings.store.url)}: {exc}", file=sys.stderr)
            return 1
        if args.json:
            sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            print(text)
        return 0

    return run


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: $SOVEREIGN_CONFIG, else the shipped default)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (the admin API's shape)")


def add_management_commands(subparsers: Any, load: LoadSettings) -> None:
    """Add `tenants` and `keys` to the `sovereign` command."""
    tenants = subparsers.add_parser("tenants", help="create, show and top up tenants; read their ledger")
    t_sub = tenants.add_subparsers(dest="action", required=True)

    p = t_sub.add_parser("create", help="create a tenant")
    p.add_argument("id")
    p.add_argument("--credits", type=int, default=0, help="opening balance (default 0)")
    p.add_argument("--low-balance-threshold", type=int, help="send tenant.balance_low when the balance falls below this")
    p.set_defaults(func=_command(tenants_create, load))

    p = t_sub.add_parser("update", help="change a tenant's low-balance threshold")
    p.add_argument("id")
    # Exactly one: an update without either used to clear the threshold without a word.
    change = p.add_mutually_exclusive_group(required=True)
    change.add_argument("--low-balance-threshold", type=int)
    change.add_argument("--clear-low-balance-threshold", action="store_true", help="no more tenant.balance_low events")
    p.set_defaults(func=_command(tenants_update, load))

    p = t_sub.add_parser("list", help="every tenant with its balance")
    p.set_defaults(func=_command(tenants_list, load))

    p = t_sub.add_parser("show", help="balance and reserved credits")
    p.add_argument("id")
    p.set_defaults(func=_command(tenants_show, load))

    p = t_sub.add_parser("topup", help="add credits, once per idempotency key")
    p.add_argument("id")
    p.add_argument("amount", type=int)
    p.add_argument("--idempotency-key", help="repeat a top-up safely (default: a new random key, printed)")
    p.set_defaults(func=_command(tenants_topup, load))

    p = t_sub.add_parser("ledger", help="ledger entries, newest first")
    p.add_argument("id")
    p.add_argument("--limit", type=int, default=100, help="1-1000 (default 100)")
    p.set_defaults(func=_command(tenants_ledger, load))

    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    k_sub = keys.add_subparsers(dest="action", required=True)

    p = k_sub.add_parser("create", help="create a key; the plaintext is printed once")
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", default="")
    p.add_argument("--models", help="comma-separated public models the key may use (default: all)")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at once")
    p.add_argument("--expires-at", type=int, help="expiry as unix seconds")
    p.add_argument("--budget", type=int, help="credits the key may spend per --budget-period")
    p.add_argument("--budget-period", choices=["day", "month", "total"], help="default: total")
    p.set_defaults(func=_command(keys_create, load))

    p = k_sub.add_parser("update", help="change a key's name, models, limits, budget or expiry (applies within units.auth.cache_seconds)")
    p.add_argument("key_id")
    p.add_argument("--name")
    p.add_argument("--models", help="comma-separated public models (empty: all)")
    p.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at once (0: no limit)")
    p.add_argument("--expires-at", type=int, help="expiry as unix seconds (0: never)")
    p.add_argument("--budget", type=int, help="credits the key may spend per --budget-period")
    p.add_argument("--budget-period", choices=["day", "month", "total"], help="default: the key's current period, else total")
    p.add_argument("--clear-budget", action="store_true", help="remove the key's budget")
    p.set_defaults(func=_command(keys_update, load))

    p = k_sub.add_parser("list", help="a tenant's keys (never the plaintext)")
    p.add_argument("--tenant", required=True)
    p.set_defaults(func=_command(keys_list, load))

    revoke_note = "gateways refuse a revoked key within units.auth.cache_seconds (their key-lookup cache)"
    p = k_sub.add_parser("revoke", help=f"revoke a key ({revoke_note})", description=f"Revoke a key; {revoke_note}.")
    p.add_argument("key_id")
    p.set_defaults(func=_command(keys_revoke, load))

    for parser in (*t_sub.choices.values(), *k_sub.choices.values()):
        _common(parser)
