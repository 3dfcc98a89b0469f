"""Opening connections to a provider host: cached, shared lookups, Happy Eyeballs, egress proxies.

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
- the connect race is ``aiohappyeyeballs.start_connection`` (what aiohttp
  uses): addresses in RFC 8305 order (families interleaved, duplicates
  dropped here first); the next attempt starts when the previous ones have
  neither connected nor failed within ``stagger`` seconds, or at once when
  one fails; the first TCP connection wins, the others are closed;
- with a ``tunnel`` (an HTTPS provider behind an egress proxy), the socket
  is the proxy's and an HTTP ``CONNECT`` to the provider opens the tunnel;
  a proxy that refuses raises `ProxyError`, naming the proxy, never its
  credentials;
- TLS, when ``ssl`` is given, starts on the winning socket (inside the
  tunnel) after the race, with SNI and the verified name ``server_hostname``.

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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohappyeyeballs

AddrInfo = tuple[Any, ...]  # (family, type, proto, canonname, sockaddr), as getaddrinfo returns them
MAX_PROXY_HEAD = 16 * 1024  # bytes of a CONNECT answer before its end


class ProxyError(OSError):
    """The egress proxy refused the tunnel or broke it; the message names the proxy (``host:port``) only."""


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
        server_hostname: str | None = None,
        ttl: float = 10.0,
        stagger: float = 0.25,
        resolve: Callable[..., Awaitable[list]] | None = None,
        tunnel: tuple[str, int] | None = None,
        proxy_authorization: str | None = None,
    ) -> None:
        """`host`/`port` is what the socket connects to: the provider, or the proxy of a `tunnel` to the provider."""
        self.host = host
        self.port = port
        self.ssl = ssl
        self.tunnel = tunnel
        self._connect_request = b""
        if tunnel is not None:
            target = f"[{tunnel[0]}]:{tunnel[1]}" if ":" in tunnel[0] else f"{tunnel[0]}:{tunnel[1]}"
            auth = f"Proxy-Authorization: {proxy_authorization}\r\n" if proxy_authorization else ""
            self._connect_request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode()
        self.server_hostname = server_hostname or (tunnel[0] if tunnel is not None else host)
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
        if self.tunnel is not None:
            try:
                await self._open_tunnel(loop, sock)
            except BaseException:
                sock.close()
                raise
        made = False

        def factory() -> asyncio.Protocol:
            nonlocal made
            protocol = protocol_factory()
            made = True
            return protocol

        try:
            return await loop.create_connection(
                factory, sock=sock, ssl=self.ssl, server_hostname=self.server_hostname if self.ssl else None
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
        """The first socket to connect (`aiohappyeyeballs`); every other attempt is cancelled and its socket closed."""
        try:
            return await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=self.stagger, interleave=1, loop=loop)
        except OSError as error:
            self._cached = None  # no address answered: look the host up again next time
            where = f"the egress proxy {self.host}:{self.port}" if self.tunnel is not None else f"{self.host}:{self.port}"
            cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
            reason = os.strerror(error.errno) if error.errno else (cause.strerror or str(cause))
            message = f"{reason} (connecting to {where})"
            # With an errno, OSError() picks the subclass (ConnectionRefusedError, TimeoutError for ETIMEDOUT).
            raised = OSError(error.errno, message) if error.errno else OSError(message)
            if self.tunnel is not None:
                raised = ProxyError(error.errno, message) if error.errno else ProxyError(message)
            raise raised from error

    async def _open_tunnel(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """``CONNECT`` through the proxy on `sock`; returns once the proxy answered 2xx."""
        assert self.tunnel is not None
        where = f"{self.host}:{self.port}"
        try:
            await loop.sock_sendall(sock, self._connect_request)
            head = b""
            while b"\r\n\r\n" not in head:
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    raise ProxyError(f"the egress proxy {where} closed the connection before answering CONNECT")
                head += data
                if len(head) > MAX_PROXY_HEAD:
                    raise ProxyError(f"the egress proxy {where} sent an oversized answer to CONNECT")
        except ProxyError:
            raise
        except OSError as exc:
            raise ProxyError(exc.errno, f"{exc.strerror or exc} (talking to the egress proxy {where})") from None
        status_line = head.partition(b"\r\n")[0]
        parts = status_line.split(None, 2)
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isascii() and parts[1].isdigit() else 0
        if not 200 <= status < 300:
            reason = f" {parts[2].decode('latin-1', 'replace')}" if len(parts) > 2 else ""
            raise ProxyError(f"the egress proxy {where} refused the tunnel to {self.tunnel[0]}:{self.tunnel[1]} (HTTP {status}{reason})")
        if head.index(b"\r\n\r\n") + 4 != len(head):
            # The provider speaks first in no protocol used here: bytes after the answer mean broken framing.
            raise ProxyError(f"the egress proxy {where} sent data after its CONNECT answer")


__all__ = ["Connector", "ProxyError", "interleave"]
