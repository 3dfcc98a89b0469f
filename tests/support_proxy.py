"""A small HTTP forward proxy for tests: ``CONNECT`` tunnels and absolute-form requests, on its own thread and loop.

It records what reaches it (`ForwardProxy.requests`: one entry per tunnel or
proxied connection), can require ``Proxy-Authorization`` (407 otherwise) and
can refuse every request with a fixed status. After the first request of a
connection it only pipes bytes both ways (a tunnel; or, for plain HTTP, the
connection stays bound to that origin, which must accept absolute-form
targets as RFC 9112 requires of every HTTP/1.1 server).

Run alone (on a free port): ``python -m tests.support_proxy [user:pass]``.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class ProxiedRequest:
    method: str  # CONNECT, or the proxied request's method
    target: str  # host:port of a CONNECT, the absolute URL otherwise
    authorization: str | None  # the Proxy-Authorization the client sent
    headers: dict[str, str] = field(default_factory=dict)


class ForwardProxy:
    """An HTTP forward proxy on 127.0.0.1; use as a context manager (``with ForwardProxy() as proxy``)."""

    def __init__(self, credentials: str | None = None, refuse: int | None = None) -> None:
        self.expected = "Basic " + base64.b64encode(credentials.encode()).decode() if credentials else None
        self.refuse = refuse
        self.requests: list[ProxiedRequest] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forward-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        authorization = headers.get("proxy-authorization")
        self.requests.append(ProxiedRequest(method, target, authorization, headers))
        if self.refuse is not None:
            writer.write(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % self.refuse)
            await writer.drain()
            return
        if self.expected is not None and authorization != self.expected:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            try:
                up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            except OSError:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            first = b""
        else:
            parts = urlsplit(target)
            up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            # The proxy's own credentials end here; the rest of the request goes on unchanged.
            kept = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"proxy-authorization:")]
            first = b"\r\n".join(kept)
        try:
            if first:
                up_writer.write(first)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:
                pass


if __name__ == "__main__":  # pragma: no cover - a manual aid
    with ForwardProxy(sys.argv[2] if len(sys.argv) > 2 else None) as running:
        print(f"forward proxy on {running.url}", flush=True)
        threading.Event().wait()
