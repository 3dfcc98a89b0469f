"""Opening connections to a provider host: cached, shared lookups and Happy Eyeballs (RFC 8305).

Why not ``loop.create_connection(host, port)``: it looks the host up on every
call, so a burst of new connections is a burst of ``getaddrinfo`` calls in the
resolver's thread pool; and uvloop's version has no Happy Eyeballs, so a host
whose first address silently drops SYNs (a broken IPv6 route) holds every
connect until the caller's timeout. `Connector` does what aiohttp's connector
did for the provider hop:

- lookups are cached for ``ttl`` seconds (``0``: not cached) and shared:
  connects that arrive while a lookup is under way wait for that one, and a
  caller that gives up does not cancel it for the others. A failed lookup is
  not cached, and a host none of whose addresses answered is looked up again
  on the next connect (the provider may have moved). An IP literal is never
  looked up;
- addresses are tried in RFC 8305 order (families interleaved); the next
  attempt starts when the previous ones have neither connected nor failed
  within ``stagger`` seconds, or at once when one fails. The first TCP
  connection wins; the other attempts are cancelled and their sockets closed;
- TLS, when ``ssl`` is given, starts on the winning socket after the race.

The caller bounds the whole connect (``asyncio.timeout``); a cancelled connect
cancels every attempt and closes every socket before it returns.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

AddrInfo = tuple[Any, ...]  # (family, type, proto, canonname, sockaddr), as getaddrinfo returns them


def interleave(infos: Iterable[AddrInfo]) -> list[AddrInfo]:
    """Addresses in RFC 8305 order: duplicates dropped, families alternating, the first result's family first."""
    families: dict[int, list[AddrInfo]] = {}  # in order of first appearance
    seen: set[tuple[int, Any]] = set()
    for info in infos:
        key = (info[0], info[4])
        if key not in seen:
            seen.add(key)
            families.setdefault(info[0], []).append(info)
    return [info for row in itertools.zip_longest(*families.values()) for info in row if info is not None]


class Connector:
    """Opens connections to one provider host: lookups cached and shared, attempts staggered (RFC 8305)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl.SSLContext | None = None,
        ttl: float = 10.0,
        stagger: float = 0.25,
        resolve: Callable[..., Awaitable[list]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl
        self.ttl = ttl
        self.stagger = stagger
        self._resolve = resolve  # None: the running loop's getaddrinfo
        self._cached: list[AddrInfo] | None = None  # one host per connector: one entry
        self._expires = 0.0
        self._lookup: asyncio.Task[list[AddrInfo]] | None = None  # the lookup under way, shared
        self._literal: list[AddrInfo] | None = None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            # Numeric only: no resolver, no thread; it keeps an IPv6 scope id, which a hand-made tuple would not.
            self._literal = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)

    async def connect(self, protocol_factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """A connected (TLS) transport and its protocol; `OSError` when the host cannot be reached."""
        loop = asyncio.get_running_loop()
        infos = self._literal if self._literal is not None else await self._addresses(loop)
        sock = await self._race(loop, infos)
        made = False

        def factory() -> asyncio.Protocol:
            nonlocal made
            protocol = protocol_factory()
            made = True
            return protocol

        try:
            return await loop.create_connection(
                factory, sock=sock, ssl=self.ssl, server_hostname=self.host if self.ssl else None
            )
        except BaseException:
            # Until the protocol exists no transport has the socket (both loops make it first). Once one
            # has, it closes the socket itself, maybe later (a TLS shutdown): closing it here too could,
            # under asyncio, leave the selector watching an fd number that a new connection then reuses.
            if not made:
                sock.close()
            raise

    async def _addresses(self, loop: asyncio.AbstractEventLoop) -> list[AddrInfo]:
        if self._cached is not None and loop.time() < self._expires:
            return self._cached
        if self._lookup is None:
            self._lookup = loop.create_task(self._look_up(loop))
        # Shielded: a caller that gives up (its timeout, its client gone) leaves the lookup to the others.
        return await asyncio.shield(self._lookup)

    async def _look_up(self, loop: asyncio.AbstractEventLoop) -> list[AddrInfo]:
        try:
            resolve = self._resolve or loop.getaddrinfo
            infos = interleave(await resolve(self.host, self.port, type=socket.SOCK_STREAM))
        finally:
            self._lookup = None  # failed or not, the next connect after this one starts afresh
        if not infos:
            raise OSError(f"no address for {self.host}:{self.port}")
        self._cached, self._expires = infos, loop.time() + self.ttl  # ttl 0: expired at once
        return infos

    async def _race(self, loop: asyncio.AbstractEventLoop, infos: list[AddrInfo]) -> socket.socket:
        """The first socket to connect; every other attempt is cancelled and its socket closed."""
        todo = deque(infos)
        running: set[asyncio.Task[socket.socket]] = set()
        errors: list[OSError] = []
        winner: socket.socket | None = None
        try:
            while todo or running:
                if todo:
                    running.add(loop.create_task(_attempt(loop, todo.popleft())))
                # The next address waits `stagger` for the attempts under way; a failure starts it at once.
                done, _ = await asyncio.wait(
                    running, timeout=self.stagger if todo else None, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    running.discard(task)
                    error = task.exception()
                    if error is None:
                        winner = task.result()
                        return winner  # another attempt done meanwhile stays in `running`: closed below
                    if not isinstance(error, OSError):
                        raise error
                    errors.append(error)
        finally:
            for task in running:
                task.cancel()
                task.add_done_callback(_close_loser)  # it may have connected just before the cancel
            if running:
                # Their sockets are closed before connect() returns or raises, not some time later.
                try:
                    await asyncio.wait(running)
                except BaseException:
                    if winner is not None:
                        winner.close()  # cancelled while tidying up: the caller never gets it
                    raise
        self._cached = None  # no address answered: look the host up again next time
        first = errors[0]
        reason = os.strerror(first.errno) if first.errno else (first.strerror or str(first))
        message = f"{reason} (connecting to {self.host}:{self.port})"
        # With an errno, OSError() picks the subclass (ConnectionRefusedError, TimeoutError for ETIMEDOUT).
        raise (OSError(first.errno, message) if first.errno else OSError(message)) from first


async def _attempt(loop: asyncio.AbstractEventLoop, info: AddrInfo) -> socket.socket:
    """One TCP connect; the socket is closed unless it connected."""
    family, type_, proto, _, address = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _close_loser(task: asyncio.Task[socket.socket]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


__all__ = ["Connector", "interleave"]
