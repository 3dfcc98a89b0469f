"""The store: async Redis (or Redis Cluster, or the embedded emulation) plus Lua scripts.

``redis://`` and ``rediss://`` URLs talk to a real Redis (add ``?cluster=true``
for Redis Cluster); ``memory://`` runs the same scripts on fakeredis inside
this process, which is convenient for one process and loses everything at exit.

Keys: every key of a tenant is ``<prefix>:{<tenant>}:<part>…``. The braces are
the hash tag, so all keys one script touches live in one cluster slot.

Scripts live beside the code that runs them (``proxy/store/lua/`` for accounts,
each unit's package for its own) and are loaded with `Script.load(package, name)`
through ``importlib.resources``; they run by SHA (EVALSHA, reloading on NOSCRIPT
after a Redis restart). ``--! include <name>`` pastes a helper from the same
package, else from ``proxy/store/lua/`` (the shared ``prelude``).

This module is the store's error boundary: every redis connection error,
timeout, socket error or "cannot serve now" reply (LOADING, READONLY, OOM,
CLUSTERDOWN/MASTERDOWN, TRYAGAIN, BUSY) raised through `Store.run` or `Store.redis` comes out
as `proxy.core.errors.StoreUnavailable` (503 ``store_unavailable``), so the
rest of the gateway catches one exception and never mistakes a client's reset
socket for a Redis outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import re
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, NoScriptError, OutOfMemoryError, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.asyncio.retry import Retry

from proxy.core.errors import StoreUnavailable
from proxy.core.tls import client_context
from proxy.store.script_client import CommandTooLarge, ScriptClient
from proxy.core.settings import StoreSettings, TLSSettings

log = structlog.get_logger("sovereign")

SHARED_LUA = "proxy.store.lua"
TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# The errors that mean "the store cannot serve now", as opposed to a bug: it
# is unreachable or slow, or it says so (a replica after a failover refusing
# writes, out of memory, a cluster reconfiguring; LOADING after a restart is a
# ConnectionError in redis-py). Only this module catches them (see `GuardedRedis`).
STORE_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError, ClusterDownError, TryAgainError, OSError,
)


_INCLUDE = re.compile(r"^--! include (\w+)$", re.MULTILINE)


def _lua_file(package: str, name: str) -> str:
    return (resources.files(package) / f"{name}.lua").read_text()


def load_lua(package: str, name: str) -> str:
    """A script's source with ``--! include <name>`` lines replaced by that file (Lua has no includes)."""

    def include(match: re.Match[str]) -> str:
        helper = match.group(1)
        if (resources.files(package) / f"{helper}.lua").is_file():
            return _lua_file(package, helper)
        return _lua_file(SHARED_LUA, helper)

    return _INCLUDE.sub(include, _lua_file(package, name))


# Script commands above this size leave the hot-path connection (see Store.run).
BULK_BYTES = 64 * 1024


class Script:
    """A Lua script run by SHA, loaded again if the server forgot it."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    @classmethod
    def load(cls, package: str, name: str) -> Script:
        """The script ``<name>.lua`` shipped in `package` (its includes resolved)."""
        return cls(name, load_lua(package, name))

    def __repr__(self) -> str:
        return f"Script({self.name!r})"

    async def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


class WaitingConnectionPool(aioredis.ConnectionPool):
    """A pool whose callers wait for a free connection during a burst.

    redis-py's plain pool raises "Too many connections" when exhausted (a 503
    for the client); its BlockingConnectionPool arms a timer for every command.
    A semaphore costs next to nothing until the pool is actually full.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._free = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self._free.acquire()
        try:
            return await super().get_connection(*args, **kwargs)
        except BaseException:
            self._free.release()
            raise

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            self._free.release()


class GuardedRedis:
    """A redis-py client whose store-down errors come out as `StoreUnavailable`.

    Commands are awaited through a wrapper; ``pipeline()`` hands back a
    pipeline whose ``execute`` is guarded the same way. Used for everything but
    the hot path's scripts, which `Store.run` guards itself.
    """

    __slots__ = ("client",)

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr
        if name == "pipeline":
            return lambda *args, **kwargs: _GuardedPipeline(attr(*args, **kwargs))

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            return _guard(result) if inspect.isawaitable(result) else result

        return call


class _GuardedPipeline:
    __slots__ = ("pipe",)

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    async def __aenter__(self) -> _GuardedPipeline:
        await self.pipe.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.pipe.__aexit__(*exc)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return await _guard(self.pipe.execute(*args, **kwargs))


async def _guard(awaitable: Any) -> Any:
    try:
        return await awaitable
    except STORE_DOWN_ERRORS as exc:
        raise StoreUnavailable() from exc


def redis_tls_options(tls: TLSSettings) -> dict[str, Any]:
    """redis-py's keywords for ``store.tls`` (its SSLConnection builds its own context from them)."""
    return {
        "ssl_ca_certs": tls.ca_file,
        "ssl_certfile": tls.cert_file,
        "ssl_keyfile": tls.key_file,
        "ssl_cert_reqs": "required" if tls.verify else "none",
        "ssl_check_hostname": tls.verify,
    }


class Store:
    """One connection pool and the loaded scripts, shared by the whole process."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.url = settings.url
        self.durable = not self.url.startswith("memory://")
        self.redis: Any = None  # a GuardedRedis once connected
        # The hot path's scripts go through the lean pipelined client where it
        # applies (a single Redis); Cluster and memory:// use redis-py for them too.
        self.script_client: ScriptClient | None = None

    # -- lifecycle -------------------------------------------------------
    async def connect(self) -> None:
        if self.redis is not None:
            return
        if not self.durable:
            import fakeredis  # imported lazily: only the embedded store needs it

            self.redis = GuardedRedis(fakeredis.FakeAsyncRedis(decode_responses=True, lua_modules=set()))
            return
        split = urlsplit(self.url)
        query = dict(parse_qsl(split.query))
        cluster = query.pop("cluster", "").lower() in {"1", "true", "yes"}
        url = urlunsplit(split._replace(query=urlencode(query)))
        common = dict(
            decode_responses=True,
            socket_timeout=self.settings.timeout,
            socket_connect_timeout=self.settings.timeout,
            # One immediate retry replaces a pooled connection that died with a
            # Redis restart; more would only delay the 503 during an outage.
            # redis-py retries only the errors listed here (not timeouts: a hung
            # Redis should answer 503 after one timeout, not two).
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        context = None
        if split.scheme == "rediss":
            # Both clients get the same TLS settings: redis-py as keywords, the script client as a context.
            common.update(redis_tls_options(self.settings.tls))
            context = client_context(self.settings.tls)  # what redis_tls_options asks of redis-py
            if not self.settings.tls.verify:
                log.warning("store.tls_unverified", message="store.tls.verify is false: the Redis server's certificate is not checked")
        if cluster:
            client = RedisCluster.from_url(url, **common)
            await _guard(client.initialize())
            self.redis = GuardedRedis(client)
        else:
            pool = WaitingConnectionPool.from_url(url, max_connections=self.settings.max_connections, **common)
            self.redis = GuardedRedis(aioredis.Redis(connection_pool=pool))
            if ScriptClient.supports(url):
                self.script_client = ScriptClient(url, self.settings.timeout, ssl_context=context, max_command_bytes=BULK_BYTES)

    async def close(self) -> None:
        if self.script_client is not None:
            await self.script_client.aclose()
            self.script_client = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def ping(self) -> bool:
        """True when the store answers; never raises."""
        try:
            await self.connect()
            return bool(await self.redis.ping())
        except Exception:
            return False

    # -- keys ------------------------------------------------------------
    def tenant_key(self, tenant: str, *parts: str) -> str:
        """A key in the tenant's hash slot: ``prefix:{tenant}:parts``."""
        return f"{self.prefix}:{{{tenant}}}:" + ":".join(parts)

    def global_key(self, *parts: str) -> str:
        """A key outside any tenant (e.g. the key-hash index)."""
        return f"{self.prefix}:" + ":".join(parts)

    # -- scripts ---------------------------------------------------------
    async def run(self, script: Script, keys: list[str], args: list[Any], deferred: bool = False) -> Any:
        """Run a Lua script by SHA.

        `deferred`: nobody is waiting on the answer (a settlement), so its write
        may share the next one (see script_client). A command over
        `BULK_BYTES` goes over redis-py's pooled connections instead of the
        script client's single pipelined one: a multi-megabyte write there would
        hold up every hold queued behind it.
        """
        client = self.script_client
        try:
            if client is not None:
                try:
                    return await script(client.deferred if deferred else client, keys, args)
                except CommandTooLarge:
                    pass  # refused before it was sent: redis-py's pool takes it
            return await script(self.redis.client, keys, args)
        except STORE_DOWN_ERRORS as exc:
            raise StoreUnavailable() from exc
