"""Tenants, credits, the ledger and API keys, on the store.

The one place that knows the Redis layout of accounts (see ``lua/prelude.lua``
for the tenant's keys). Used by the admin API, the CLI, the auth unit and
`/v1/credits`; metering adds holds and charges through its own scripts on
the same keys.

API keys are ``sk-sov-live-`` + 40 base62 characters from `secrets`. Only
their SHA-256 is stored; the plaintext exists once, in the create answer.
Key records live outside any tenant slot (``<prefix>:key:<sha256>``) because
a lookup starts from the key alone.
"""

from __future__ import annotations

import calendar
import hashlib
import re
import bisect
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core.call import Principal
from proxy.core.errors import ApiError, invalid_request, not_found
from proxy.store.events import events_key, mark_pending, tenants_key
from proxy.store.store import Script, TENANT_ID, Store
from proxy.store.usage import DAY, MAX_DAYS, bucket_key

TENANT_CREATE = Script.load("proxy.store.lua", "tenant_create")
TENANT_VIEW = Script.load("proxy.store.lua", "tenant_view")
TENANT_CREDIT = Script.load("proxy.store.lua", "tenant_credit")
BUDGET_SEED = Script.load("proxy.store.lua", "budget_seed")
LEDGER_PAGE = Script.load("proxy.store.lua", "ledger_page")
LEDGER_FOLD = Script.load("proxy.store.lua", "ledger_fold")
BUDGET_PERIODS = ("day", "month", "total")
MAX_TENANTS_LISTED = 1000

KEY_PREFIX = "sk-sov-live-"
KEY_RANDOM_CHARS = 40
_BASE62 = string.ascii_letters + string.digits
MAX_CREDITS = 10**15  # keeps every sum well inside Lua's exact integer range
# The largest balance a top-up may reach: with charges and one more top-up, still below 2**53.
MAX_BALANCE = 4 * 10**15


def random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


def new_api_key() -> str:
    return KEY_PREFIX + random_base62(KEY_RANDOM_CHARS)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


_KEY_SHAPE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9]{32,256}")


def looks_like_key(value: str) -> bool:
    return _KEY_SHAPE.fullmatch(value) is not None


def now_ms() -> int:
    return int(time.time() * 1000)


def check_tenant_id(tenant: Any, param: str = "id") -> str:
    if not isinstance(tenant, str) or not TENANT_ID.fullmatch(tenant):
        raise invalid_request(
            "A tenant id is 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit.",
            param=param,
        )
    return tenant


def check_credits(value: Any, param: str, *, positive: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_request("Credits are an integer.", param=param)
    low = 1 if positive else 0
    if not low <= value <= MAX_CREDITS:
        raise invalid_request(f"Credits must be between {low} and {MAX_CREDITS}.", param=param)
    return value


def budget_keys(store: Store, tenant: str, key_id: str) -> tuple[str, str]:
    """A key's budget HASH and its open holds ZSET, in the tenant's slot (see metering's budget.lua)."""
    return store.tenant_key(tenant, "budget", key_id), store.tenant_key(tenant, "budget_holds", key_id)


def period_id(period: str | None, at: float) -> str:
    """The id of the budget period holding `at`: ``d:YYYYMMDD``, ``m:YYYYMM`` (UTC) or ``t`` (total)."""
    if period == "day":
        return time.strftime("d:%Y%m%d", time.gmtime(at))
    if period == "month":
        return time.strftime("m:%Y%m", time.gmtime(at))
    return "t"


def _entry_prefix(fields: dict[str, Any]) -> str:
    # The Lua side appends `,"balance_after":N}`.
    return orjson.dumps(fields).decode()[:-1]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored API key, without its plaintext or hash."""

    id: str
    tenant: str
    name: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    models: tuple[str, ...]
    rpm: int | None
    max_concurrency: int | None
    budget_credits: int | None = None
    budget_period: str | None = None

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> KeyRecord:
        return cls(
            id=data["id"],
            tenant=data["tenant"],
            name=data.get("name", ""),
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]) if data.get("expires_at") else None,
            revoked_at=float(data["revoked_at"]) if data.get("revoked_at") else None,
            models=tuple(orjson.loads(data.get("models") or "[]")),
            rpm=int(data["rpm"]) if data.get("rpm") else None,
            max_concurrency=int(data["max_concurrency"]) if data.get("max_concurrency") else None,
            budget_credits=int(data["budget_credits"]) if data.get("budget_credits", "") != "" else None,
            budget_period=data.get("budget_period") or None,
        )

    def usable(self, at: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or at < self.expires_at)

    def principal(self) -> Principal:
        return Principal(
            tenant=self.tenant,
            key_id=self.id,
            name=self.name,
            models=frozenset(self.models),
            rpm=self.rpm,
            max_concurrency=self.max_concurrency,
            expires_at=self.expires_at,
            budget_credits=self.budget_credits,
            budget_period=self.budget_period,
        )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "api_key",
            "tenant": self.tenant,
            "name": self.name,
            "created_at": int(self.created_at),
            "expires_at": int(self.expires_at) if self.expires_at else None,
            "revoked_at": int(self.revoked_at) if self.revoked_at else None,
            "models": list(self.models),
            "rpm": self.rpm,
            "max_concurrency": self.max_concurrency,
            "budget": {"credits": self.budget_credits, "period": self.budget_period} if self.budget_credits is not None else None,
        }


class Accounts:
    """Tenant and key operations on one store."""

    def __init__(self, store: Store, *, events: bool = False) -> None:
        self.store = store
        self.events = events  # record webhook events (webhooks.url is set)

    # -- keys of the layout ---------------------------------------------
    def tenant_keys(self, tenant: str) -> tuple[str, str, str]:
        k = self.store.tenant_key
        return k(tenant, "tenant"), k(tenant, "ledger"), k(tenant, "ledger_ids")

    def hold_keys(self, tenant: str) -> tuple[str, str, str]:
        k = self.store.tenant_key
        return k(tenant, "tenant"), k(tenant, "holds"), k(tenant, "hold_amounts")

    # -- tenants -------------------------------------------------------------
    async def create_tenant(self, tenant: str, credits: int = 0, low_balance_threshold: int | None = None) -> dict[str, Any]:
        check_tenant_id(tenant)
        check_credits(credits, "credits", positive=False)
        if low_balance_threshold is not None:
            check_credits(low_balance_threshold, "low_balance_threshold", positive=False)
        created = time.time()
        entry = _entry_prefix(
            {"id": f"grant:{tenant}", "type": "grant", "credits": credits, "created_at": int(created)}
        )
        done = await self.store.run(TENANT_CREATE, list(self.tenant_keys(tenant)), [tenant, credits, created, entry])
        if not done:
            raise ApiError(409, f"Tenant `{tenant}` already exists.", code="tenant_exists", param="id")
        await self.store.redis.sadd(tenants_key(self.store), tenant)
        if low_balance_threshold is not None:
            return await self.update_tenant(tenant, low_balance_threshold)
        return await self.tenant(tenant)

    async def update_tenant(self, tenant: str, low_balance_threshold: int | None) -> dict[str, Any]:
        """Set (or clear, with None) the tenant's low-balance threshold."""
        await self.tenant(tenant)
        key = self.store.tenant_key(tenant, "tenant")
        if low_balance_threshold is None:
            await self.store.redis.hdel(key, "low_balance_threshold")
        else:
            check_credits(low_balance_threshold, "low_balance_threshold", positive=False)
            await self.store.redis.hset(key, "low_balance_threshold", low_balance_threshold)
        return await self.tenant(tenant)

    async def list_tenants(self, limit: int = MAX_TENANTS_LISTED, after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """The views of up to `limit` tenants by id, after the id `after`; and whether more follow."""
        ids = sorted(await self.store.redis.smembers(tenants_key(self.store)))
        if after is not None:
            ids = ids[bisect.bisect_right(ids, after):]
        views = []
        for tenant in ids[:limit]:
            try:
                views.append(await self.tenant(tenant))
            except ApiError:
                continue  # listed but gone
        return views, len(ids) > limit

    async def tenant(self, tenant: str) -> dict[str, Any]:
        """The tenant's public view; 404 when it does not exist."""
        if not isinstance(tenant, str) or not TENANT_ID.fullmatch(tenant):
            raise not_found("tenant")
        view = await self.store.run(TENANT_VIEW, list(self.hold_keys(tenant)), [now_ms()])
        if not view:
            raise not_found("tenant")
        balance, reserved, created, *rest = view
        threshold = rest[0] if rest else ""
        return {
            "id": tenant,
            "object": "tenant",
            "balance": int(balance),
            "reserved": int(reserved),
            "available": int(balance) - int(reserved),
            "created_at": int(float(created)),
            "low_balance_threshold": int(threshold) if threshold != "" else None,
        }

    async def add_credits(self, tenant: str, amount: int, idempotency_key: str) -> tuple[bool, dict[str, Any]]:
        """Top up once per idempotency key; returns (applied, tenant view)."""
        check_credits(amount, "amount", positive=True)
        if not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= 200:
            raise invalid_request("`idempotency_key` is a string of 1-200 characters.", param="idempotency_key")
        entry_id = f"topup:{idempotency_key}"
        entry = _entry_prefix({"id": entry_id, "type": "topup", "credits": amount, "created_at": int(time.time())})
        keys = [*self.tenant_keys(tenant), events_key(self.store, tenant), self.store.tenant_key(tenant, "topups")]
        args = [amount, entry_id, entry, "1" if self.events else "", int(time.time()), MAX_BALANCE]
        status, _, pushed = await self.store.run(TENANT_CREDIT, keys, args)
        if status == -1:
            raise not_found("tenant")
        if status == -2:
            raise invalid_request(f"This top-up would take the balance above {MAX_BALANCE:,} credits.", param="amount")
        if status == -3:
            # As the IETF Idempotency-Key draft says: a reused key with another payload is the client's error.
            raise ApiError(
                422, "This idempotency key was already used for a top-up of a different amount; nothing changed.",
                code="idempotency_key_reused", param="idempotency_key",
            )
        if pushed:
            await mark_pending(self.store, tenant)
        return status == 1, await self.tenant(tenant)

    async def ledger(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        entries, _ = await self.ledger_page(tenant, limit)
        return entries

    async def ledger_page(self, tenant: str, limit: int = 100, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Entries newest first and the cursor of the next (older) page, None at the end.

        Cursors are positions counted from the oldest entry, so new entries do
        not shift them; a retention fold (`fold_ledger`) does.
        """
        await self.tenant(tenant)  # 404 for an unknown tenant
        if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) < 16):
            raise invalid_request("`cursor` is the `next_cursor` of a previous page.", param="cursor")
        _, ledger_key, _ = self.tenant_keys(tenant)
        length, first, rows = await self.store.run(LEDGER_PAGE, [ledger_key], [cursor or "", limit])
        remaining = int(length) - int(first) - len(rows)
        return [orjson.loads(row) for row in rows], str(remaining) if remaining > 0 and rows else None

    async def fold_ledger(self, tenant: str, before: float, batch: int = 1000) -> int:
        """Fold entries created before `before` (unix s) into one opening-balance entry; returns how many were folded.

        The ledger's sum (and every entry's ``balance_after``) is unchanged:
        the opening entry carries the folded entries' summed credits and the
        balance after the newest of them. Reads run outside the script (old
        entries never change; new ones only arrive at the newest end).
        """
        await self.tenant(tenant)
        _, ledger_key, _ = self.tenant_keys(tenant)
        redis = self.store.redis
        count, credits, folded_before = 0, 0, 0
        newest_raw: str | None = None
        newest: dict[str, Any] = {}
        length = await redis.llen(ledger_key)
        while count < length:
            rows = await redis.lrange(ledger_key, -(count + batch), -(count + 1))
            done = False
            for raw in reversed(rows):  # oldest first
                entry = orjson.loads(raw)
                if float(entry.get("created_at") or 0) >= before:
                    done = True
                    break
                count += 1
                credits += int(entry.get("credits") or 0)
                folded_before += int(entry.get("folded_entries") or 1) if entry.get("type") == "opening_balance" else 1
                newest_raw, newest = raw, entry
            if done or len(rows) < batch:
                break
        if newest_raw is None or (count == 1 and newest.get("type") == "opening_balance"):
            return 0
        opening = orjson.dumps(
            {
                "id": f"opening:{int(newest.get('created_at') or 0)}",
                "type": "opening_balance",
                "credits": credits,
                "folded_entries": folded_before,
                "created_at": int(newest.get("created_at") or 0),
                "balance_after": newest.get("balance_after"),
            }
        ).decode()
        if not await self.store.run(LEDGER_FOLD, [ledger_key], [count, newest_raw, opening]):
            return 0  # another replica folded meanwhile
        return count

    # -- keys ----------------------------------------------------------------
    def _key_record_key(self, digest: str) -> str:
        return self.store.global_key("key", digest)

    def _key_id_key(self, key_id: str) -> str:
        return self.store.global_key("keyid", key_id)

    async def create_key(
        self,
        tenant: str,
        *,
        name: str = "",
        models: list[str] | None = None,
        rpm: int | None = None,
        max_concurrency: int | None = None,
        expires_at: float | None = None,
        budget_credits: int | None = None,
        budget_period: str | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create a key; returns the plaintext (shown once) and the record."""
        await self.tenant(tenant)  # the tenant must exist
        plaintext = new_api_key()
        digest = hash_key(plaintext)
        key_id = "key_" + random_base62(20)
        created = time.time()
        fields = {
            "id": key_id,
            "tenant": tenant,
            "name": name,
            "created_at": repr(created),
            "expires_at": repr(float(expires_at)) if expires_at else "",
            "revoked_at": "",
            "models": orjson.dumps(list(models or [])).decode(),
            "rpm": str(rpm) if rpm else "",
            "max_concurrency": str(max_concurrency) if max_concurrency else "",
            "budget_credits": str(budget_credits) if budget_credits is not None else "",
            "budget_period": (budget_period or "total") if budget_credits is not None else "",
        }
        redis = self.store.redis
        # Three single-key writes (they live in different cluster slots); the
        # record goes last, so a key is never valid before it is listed.
        await redis.set(self._key_id_key(key_id), digest)
        await redis.sadd(self.store.tenant_key(tenant, "keys"), key_id)
        await redis.hset(self._key_record_key(digest), mapping=fields)
        return plaintext, KeyRecord.from_hash(fields)

    async def lookup(self, plaintext: str) -> KeyRecord | None:
        """The record for a presented key, or None (unknown). Revocation is the caller's check."""
        return await self.lookup_digest(hash_key(plaintext))

    async def lookup_digest(self, digest: str) -> KeyRecord | None:
        """Like `lookup`, from the key's SHA-256 hex digest (callers that already hashed it)."""
        data = await self.store.redis.hgetall(self._key_record_key(digest))
        return KeyRecord.from_hash(data) if data else None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        digest = await self.store.redis.get(self._key_id_key(key_id))
        if not digest:
            return None
        data = await self.store.redis.hgetall(self._key_record_key(digest))
        return KeyRecord.from_hash(data) if data else None

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        """Change a key's name, models, rpm, max_concurrency, expires_at or budget (None clears one).

        Gateways see the change within ``units.auth.cache_seconds`` (their key cache).
        """
        digest = await self.store.redis.get(self._key_id_key(key_id)) if isinstance(key_id, str) else None
        if not digest:
            raise not_found("key")
        fields: dict[str, str] = {}
        for name, value in changes.items():
            if name == "models":
                fields["models"] = orjson.dumps(list(value or [])).decode()
            elif name == "expires_at":
                fields["expires_at"] = repr(float(value)) if value else ""
            elif name == "budget":
                fields["budget_credits"] = str(value["credits"]) if value else ""
                fields["budget_period"] = value.get("period") or "total" if value else ""
            elif name == "name":
                fields["name"] = value or ""
            else:
                fields[name] = str(value) if value else ""
        record_key = self._key_record_key(digest)
        if fields:
            await self.store.redis.hset(record_key, mapping=fields)
        record = await self.get_key(key_id)
        if record is None:
            raise not_found("key")
        if changes.get("budget"):
            await self._seed_budget(record)
        return record

    async def _seed_budget(self, record: KeyRecord) -> None:
        """Start a budget just set (or changed) from what the key was charged in its period (budget_seed.lua)."""
        now = time.time()
        today = int(now) - int(now) % DAY
        if record.budget_period == "day":
            first = today
        elif record.budget_period == "month":
            first = int(calendar.timegm(time.gmtime(now)[:2] + (1, 0, 0, 0)))
        else:  # the key's lifetime, as far back as the daily usage is kept
            first = max(int(record.created_at) - int(record.created_at) % DAY, today - MAX_DAYS * DAY)
        days = [bucket_key(self.store, record.tenant, "d", day) for day in range(first, today + DAY, DAY)]
        budget_key, _ = budget_keys(self.store, record.tenant, record.id)
        await self.store.run(BUDGET_SEED, [budget_key, *days], [period_id(record.budget_period, now), record.id])

    async def key_spending(self, record: KeyRecord) -> dict[str, int]:
        """What a key has spent in its budget's current period and holds open (0 without a budget)."""
        if record.budget_credits is None:
            return {"spent": 0, "held": 0}
        budget_key, _ = budget_keys(self.store, record.tenant, record.id)
        period, spent, held = await self.store.redis.hmget(budget_key, "period", "spent", "held")
        current = period == period_id(record.budget_period, time.time())
        return {"spent": int(spent or 0) if current else 0, "held": int(held or 0)}

    async def public_key(self, record: KeyRecord) -> dict[str, Any]:
        """The key's public view with its budget's spending filled in."""
        public = record.public()
        if public["budget"] is not None:
            public["budget"].update(await self.key_spending(record))
        return public

    async def list_keys(self, tenant: str) -> list[KeyRecord]:
        await self.tenant(tenant)
        ids = await self.store.redis.smembers(self.store.tenant_key(tenant, "keys"))
        records = [await self.get_key(key_id) for key_id in sorted(ids)]
        return sorted((r for r in records if r is not None), key=lambda r: r.created_at)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        digest = await self.store.redis.get(self._key_id_key(key_id)) if isinstance(key_id, str) else None
        if not digest:
            raise not_found("key")
        record_key = self._key_record_key(digest)
        # HSETNX: revoking twice keeps the first revocation time.
        await self.store.redis.hsetnx(record_key, "revoked_at", repr(time.time()))
        if not await self.store.redis.hget(record_key, "revoked_at"):
            await self.store.redis.hset(record_key, "revoked_at", repr(time.time()))
        record = await self.get_key(key_id)
        assert record is not None
        return record
