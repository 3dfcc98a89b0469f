"""A lean, pipelined Redis client for the hot path's Lua scripts.

Every metered request runs two scripts (hold, settle). redis-py's generic
machinery (connection pool, locks, per-command hooks) costs more CPU than the
scripts themselves, so `Store.run` sends them through this client instead:

- one connection per process; the commands of one event-loop iteration go
  out in one write and their replies are matched in order (RESP is strictly
  ordered), so any number of concurrent requests share the connection without
  waiting for each other;
- commands nobody waits on (settlements: the reply has already gone out)
  can be sent *deferred*: they ride along with the next urgent write, or go
  out on their own after `DEFER_SECONDS`. Each write wakes Redis (a syscall
  and a context switch); this halves the writes of a metered request;
- replies are parsed by hiredis;
- one watchdog timer per connection instead of one per command: a reply that
  takes longer than the store timeout drops the connection, failing what is
  pending with a timeout (the request answers 503, like redis-py would). The
  clock starts when a command is written, not when it is queued: a loop
  stalled between the two (a long iteration of hundreds of requests, a GC
  pause, a CPU-throttled container) is not Redis being late;
- a lost connection fails what is pending with a connection error and the
  next command reconnects, so the gateway recovers from a Redis restart
  without a restart of its own.

It speaks only what scripts need (AUTH, SELECT, EVALSHA, SCRIPT LOAD) and
raises redis-py's exception types, so callers handle both clients alike.
Redis Cluster and the embedded store keep using redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from hiredis import pack_command as _pack_command
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Longest a deferred command waits for an urgent one to share its write.
DEFER_SECONDS = 0.002


class CommandTooLarge(Exception):
    """A command over the client's `max_command_bytes`, not sent: the caller sends it another way (see Store.run)."""


def encode_command(*args: Any) -> bytes:
    """One RESP command: an array of bulk strings.

    hiredis encodes it in C (3.5x faster than the loop below on a hold's
    arguments, 1.7x on a stored response's: bench/RESULTS.md); the loop covers
    what hiredis refuses (bools, other types).
    """
    try:
        return _pack_command(args)
    except TypeError:
        return _encode_command(args)


def _encode_command(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


# Error replies by their first word, as redis-py types them. Besides NOSCRIPT
# and auth, the replies of a server that cannot serve now: still loading its
# data after a restart, a replica (after a failover), out of memory, a cluster
# reconfiguring, busy with a long script. The store maps these to "store
# down" (503), not a bug (500).
_ERRORS: dict[str, type[Exception]] = {
    "NOSCRIPT": NoScriptError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
    "OOM": OutOfMemoryError,
    "MASTERDOWN": MasterDownError,
    "CLUSTERDOWN": ClusterDownError,
    "TRYAGAIN": TryAgainError,
    "BUSY": RedisConnectionError,  # redis-py has no type of its own for it
}


def _error(reply: hiredis.ReplyError) -> Exception:
    message = str(reply)
    return _ERRORS.get(message.partition(" ")[0], ResponseError)(message)


class _Connection(asyncio.Protocol):
    """One connection: replies resolve the oldest waiting futures, in order."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.reader = hiredis.Reader(encoding="utf-8")
        # Futures in the order their replies will come (queued ones included).
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        # The watchdog's clock: (written at, commands written so far) per write,
        # read against the replies counted so far (no per-reply bookkeeping).
        self.writes: collections.deque[tuple[float, int]] = collections.deque()
        self._written = 0
        self._answered = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._timed_out = False
        self._watchdog: asyncio.TimerHandle | None = None
        # Commands waiting for the next write (one syscall for all of them).
        self._outgoing: list[bytes] | None = None
        self._flush_soon = False  # a flush is scheduled for this loop iteration
        self._flush_timer: asyncio.TimerHandle | None = None  # ... or after DEFER_SECONDS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            self._answered += 1
            future = self.waiting.popleft()
            if future.done():
                continue  # its caller gave up; the reply is simply dropped
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        error: Exception = (
            RedisTimeoutError("Redis did not answer in time")
            if self._timed_out
            else RedisConnectionError("Connection to Redis lost")
        )
        self.writes.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, command: bytes, deferred: bool = False) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise RedisConnectionError("Connection to Redis lost")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append(future)
        if self._outgoing is None:
            self._outgoing = [command]
        else:
            self._outgoing.append(command)
        if not deferred:
            if not self._flush_soon:
                self._flush_soon = True
                loop.call_soon(self._flush)
        elif not self._flush_soon and self._flush_timer is None:
            self._flush_timer = loop.call_later(DEFER_SECONDS, self._flush)
        return future

    def _flush(self) -> None:
        self._flush_soon = False
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        outgoing, self._outgoing = self._outgoing, None
        if outgoing and not self.closed and self.transport is not None:
            # A closed connection already failed these commands' futures.
            self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))
            loop = asyncio.get_running_loop()
            self._written += len(outgoing)
            writes = self.writes
            if writes and writes[0][1] <= self._answered:
                writes.popleft()  # answered: keeps the deque short between watchdog runs
            writes.append((loop.time(), self._written))
            if self._watchdog is None:
                self._watchdog = loop.call_later(self.timeout, self._check)

    def _check(self) -> None:
        """Drop the connection when the oldest reply is overdue; re-arm while work is pending."""
        self._watchdog = None
        writes = self.writes
        while writes and writes[0][1] <= self._answered:
            writes.popleft()
        if not writes or self.closed:
            return
        loop = asyncio.get_running_loop()
        overdue = loop.time() - writes[0][0] - self.timeout
        if overdue >= 0:
            self._timed_out = True
            assert self.transport is not None
            self.transport.abort()
            return
        self._watchdog = loop.call_later(-overdue, self._check)


class ScriptClient:
    """EVALSHA / SCRIPT LOAD over one pipelined connection (see the module docstring)."""

    def __init__(self, url: str, timeout: float, ssl_context: ssl.SSLContext | None = None,
                 max_command_bytes: int | None = None) -> None:
        """`ssl_context` for ``rediss://`` (default: the system's CAs), built from the same settings as redis-py's;
        a command longer than `max_command_bytes` raises `CommandTooLarge` instead of being sent."""
        self.url = url
        self.timeout = timeout
        self.max_command_bytes = max_command_bytes
        self.ssl_context = ssl_context
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        # The same client, sending deferred (see the module docstring).
        self.deferred = DeferredScripts(self)

    @staticmethod
    def supports(url: str) -> bool:
        """Plain URLs only: options in the query (db, TLS settings, cluster) stay with redis-py,
        so both clients always talk to the same database the same way."""
        split = urlsplit(url)
        return split.scheme in ("redis", "rediss") and not split.query

    async def evalsha(self, sha: str, numkeys: int, *args: Any) -> Any:
        return await self._call("EVALSHA", sha, numkeys, *args)

    async def script_load(self, source: str) -> Any:
        return await self._call("SCRIPT", "LOAD", source)

    async def _call(self, *args: Any, deferred: bool = False) -> Any:
        # Encoded first: its length is the size check, at no cost beyond the encoding itself.
        command = encode_command(*args)
        if self.max_command_bytes is not None and len(command) > self.max_command_bytes:
            raise CommandTooLarge(f"{len(command)} bytes")
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        return await connection.send(command, deferred)

    async def _connect(self) -> _Connection:
        # Concurrent callers share one connection attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[_Connection]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._connection = attempt.result()

    async def _open(self) -> _Connection:
        split = urlsplit(self.url)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                context = None
                if split.scheme == "rediss":
                    context = self.ssl_context or ssl.create_default_context()
                transport, connection = await loop.create_connection(
                    lambda: _Connection(self.timeout), split.hostname or "127.0.0.1", split.port or 6379, ssl=context
                )
                try:
                    await self._handshake(connection, split)
                except BaseException:
                    transport.close()  # a refused AUTH must not leave the socket open
                    raise
        except TimeoutError:
            raise RedisTimeoutError(f"Redis did not accept a connection within {time.monotonic() - started:.1f}s") from None
        except OSError as exc:
            raise RedisConnectionError(f"Cannot connect to Redis: {exc.strerror or exc}") from None
        return connection

    @staticmethod
    async def _handshake(connection: _Connection, split: Any) -> None:
        if split.password is not None:
            username = unquote(split.username) if split.username else None
            password = unquote(split.password)
            await connection.send(encode_command("AUTH", *([username] if username else []), password))
        db = split.path.lstrip("/")
        if db and db != "0":
            await connection.send(encode_command("SELECT", int(db)))

    async def aclose(self) -> None:
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.close()
        self._connection = None


class DeferredScripts:
    """`ScriptClient` calls whose writes may wait up to `DEFER_SECONDS` for company."""

    __slots__ = ("client",)

    def __init__(self, client: ScriptClient) -> None:
        self.client = client

    async def evalsha(self, sha: str, numkeys: int, *args: Any) -> Any:
        return await self.client._call("EVALSHA", sha, numkeys, *args, deferred=True)

    async def script_load(self, source: str) -> Any:
        return await self.client._call("SCRIPT", "LOAD", source, deferred=True)
