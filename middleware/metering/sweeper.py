"""Holds whose replica died: found through a deadline index and settled at their checkpoints, on every replica.

A stream's hold is checkpointed every ``checkpoint_seconds`` (`hold_checkpoint`:
credits so far, the ledger entry to write and what its settlement adds to the
usage aggregates, the key's budget and the events, plus a later expiry). If its
replica dies, nobody settles it; when it expires it must be *charged* at its
checkpoint, not released — even if its tenant never sends another request.

Finding those holds must not scan keys. Each checkpoint also puts
``<tenant>/<hold id>`` into a deadline index, a sorted set by expiry, sharded
into `SHARDS` keys ``<prefix>:hold_deadlines:{<n>}`` (each its own cluster
slot, the tenant's shard fixed by a CRC of its id). Every replica runs a
`HoldSweeper`: every ``sweep_seconds`` it reads each shard's due entries and,
per tenant, runs `hold_expire` in the tenant's slot (Redis Cluster lets a
script touch only one slot, so the index and the tenant's keys are never in
one script). Then it drops the index entries of holds that are gone and
moves those still open to their current expiry. Replicas sweeping the same
tenant at once are harmless: the script is atomic and a settled hold is gone.

The index is written after the checkpoint (both deferred, usually in one
write), so an entry is never missing for a checkpointed hold for longer than
that write; an entry whose hold was settled normally is dropped by the sweep
at its expiry.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import defaultdict
from typing import Any

import orjson
import structlog

from proxy.core.errors import StoreUnavailable
from proxy.store.accounts import now_ms
from proxy.store.events import mark_pending
from proxy.store.store import Script, Store

log = structlog.get_logger("sovereign")

HOLD_EXPIRE = Script.load("middleware.metering", "hold_expire")
DEADLINE_INDEX = Script.load("middleware.metering", "deadline_index")

SHARDS = 16  # fixed: changing it would orphan index entries
BATCH = 500  # index entries read per shard and round


def checkpoint_keys(store: Store, tenant: str) -> list[str]:
    """Keys of hold_expire: the tenant's credit keys, then its checkpointed holds and their checkpoints."""
    k = store.tenant_key
    parts = ("tenant", "holds", "hold_amounts", "ledger", "ledger_ids", "checkpointed_holds", "hold_checkpoints",
             "hold_checkpoint_tails")
    return [k(tenant, part) for part in parts]


def index_key(store: Store, tenant: str) -> str:
    return store.global_key("hold_deadlines", "{%d}" % (zlib.crc32(tenant.encode()) % SHARDS))


class HoldSweeper:
    """Settles expired checkpointed holds of any tenant, every `interval` seconds (see the module docstring)."""

    def __init__(self, store: Store, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def register(self, tenant: str, hold_id: str, expires_ms: int) -> None:
        """Index a checkpointed hold by its expiry (deferred: it rides along with the checkpoint's write)."""
        await self.store.run(DEADLINE_INDEX, [index_key(self.store, tenant)], [expires_ms, f"{tenant}/{hold_id}"], deferred=True)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except StoreUnavailable:
                pass  # the store is down: the next round tries again
            except Exception as exc:  # never let one bad entry stop the sweeping
                log.error("metering.sweep_failed", error=repr(exc))

    async def sweep(self) -> int:
        """One round over every shard; returns the number of index entries handled."""
        redis = self.store.redis
        handled = 0
        for shard in range(SHARDS):
            key = self.store.global_key("hold_deadlines", "{%d}" % shard)
            now = now_ms()
            members = await redis.zrangebyscore(key, "-inf", now, start=0, num=BATCH)
            if not members:
                continue
            by_tenant: dict[str, list[str]] = defaultdict(list)
            for member in members:
                tenant, _, hold = member.partition("/")
                by_tenant[tenant].append(hold)
            for tenant, holds in by_tenant.items():
                keys = checkpoint_keys(self.store, tenant)
                answer = await self.store.run(HOLD_EXPIRE, keys + await self._tail_keys(keys[7], holds), [now, *holds])
                await self._update(key, tenant, holds, answer[:-1])
                if int(answer[-1]):
                    await mark_pending(self.store, tenant)  # a low-balance or budget event to deliver
            handled += len(members)
        return handled

    async def _tail_keys(self, tails_key: str, holds: list[str]) -> list[str]:
        """The keys the due holds' settlement tails name, for hold_expire to declare (a script may touch only those)."""
        keys: dict[str, None] = {}
        for tail in await self.store.redis.hmget(tails_key, holds):
            if tail:
                keys.update(dict.fromkeys(orjson.loads(tail)["k"]))
        return list(keys)

    async def _update(self, key: str, tenant: str, holds: list[str], expiries: list[Any]) -> None:
        gone = [f"{tenant}/{hold}" for hold, expiry in zip(holds, expiries, strict=True) if not int(expiry)]
        later = {f"{tenant}/{hold}": int(expiry) for hold, expiry in zip(holds, expiries, strict=True) if int(expiry)}
        if gone:
            await self.store.redis.zrem(key, *gone)
        if later:
            await self.store.redis.zadd(key, later, xx=True)
