"""Test harness: settings builders, in-process gateways, and real subprocesses.

Everything here talks over real sockets. Redis state of a test lives under a
unique key prefix and is deleted afterwards, so tests share the machine's Redis
(``SOVEREIGN_TEST_REDIS_URL``) without seeing each other.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.web.app import create_app
from proxy.web.body import RUNNER_OPTIONS
from proxy.core.gateway import GATEWAY, Gateway
from proxy.web.middlewares import AccessLogger
from proxy.core.settings import Settings, deep_merge

REDIS_URL = os.environ.get("SOVEREIGN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token-0123456789"


def unique_prefix() -> str:
    return f"sovtest-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll state that has no event to wait on (client-side counters, open sockets)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll an async check (store state) until it holds; fails the test with a timeout otherwise."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(interval)


def self_signed_certificate(directory: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for `host` (an IP address or a DNS name) and its key, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    try:
        san = f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        san = f"DNS:{host}"
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={host}",
         "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def settings_data(
    upstream_url: str,
    *,
    store_url: str = "memory://",
    prefix: str | None = None,
    pipeline: list[str] | None = None,
    units: dict[str, Any] | None = None,
    admin_token: str | None = ADMIN_TOKEN,
    **overrides: Any,
) -> dict[str, Any]:
    """Plain settings data for a test gateway in front of `upstream_url`."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "warning", "access_log": False},
        "store": {"url": store_url, "prefix": prefix or unique_prefix()},
        "admin": {"token": admin_token},
        "upstreams": {"default": {"url": upstream_url, "api_key": "sk-upstream-secret-test-key-0123456789", "model": "mock-model"}},
        "models": {
            "sovereign-alpha": {"upstream": "default", "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}},
        },
        "pipeline": list(pipeline) if pipeline is not None else [],
        "units": units or {},
    }
    return deep_merge(data, overrides)


def make_settings(upstream_url: str, **kwargs: Any) -> Settings:
    return Settings.model_validate(settings_data(upstream_url, **kwargs))


@dataclass
class RunningGateway:
    """A gateway served on a real loopback socket inside the test's event loop."""

    server: TestServer
    app: web.Application
    base_url: str  # http://127.0.0.1:PORT
    clients: list[Any] = field(default_factory=list)

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def openai(self, api_key: str = "sk-sov-live-none", **kwargs: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.v1, api_key=api_key, max_retries=0, timeout=30, **kwargs)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        await self.server.close()


async def start_gateway(settings: Settings) -> RunningGateway:
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1", port=0)
    # Runner options go to start_server: the same as `sovereign serve` uses.
    await server.start_server(access_log_class=AccessLogger, **RUNNER_OPTIONS)  # TestServer already cancels handlers on disconnect
    return RunningGateway(server=server, app=app, base_url=f"http://127.0.0.1:{server.port}")


async def cleanup_redis_prefix(prefix: str, url: str = REDIS_URL) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    except Exception:
        pass  # a test that stopped Redis cleans nothing; its prefix is unique anyway
    finally:
        await client.aclose()


class Process:
    """A real `sovereign …` subprocess, with its output kept for assertions."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.log_path = log_path
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


async def wait_http(url: str, timeout: float = 15.0, proc: Process | None = None) -> None:
    """Poll `url` until it answers (any status)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(f"process exited early:\n{proc.output()[-3000:]}")
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


async def spawn_gateway(
    data: dict[str, Any], tmp_path: Path, name: str = "gw", env: dict[str, str] | None = None, timeout: float = 15.0
) -> tuple[Process, str]:
    """Run `sovereign serve` on a free port with `data` as its config file (and `env` added to its environment)."""
    port = free_port()
    data = deep_merge(data, {"server": {"port": port, "host": "127.0.0.1"}})
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = Process(["serve", "--config", str(config)], env=env, log_path=tmp_path / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_http(base + "/healthz", timeout, proc=proc)
    except BaseException:
        proc.stop()  # a gateway that never came up must not outlive the test
        raise
    return proc, base


class OwnRedis:
    """A private redis-server on a free port (never the shared one): stopped, paused, restarted by tests.

    Data survives `stop()`/`start()` (append-only file, fsync always), as a
    real deployment's Redis would across a restart.
    """

    def __init__(self, directory: Path, *extra_args: str) -> None:
        self.port = free_port()
        self.dir = directory
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, *once_args: str, wait: bool = True) -> None:
        """Start it (with `once_args` added for this start only); `wait`: until it answers PING (data loaded)."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir), "--daemonize", "no", *self.extra_args, *once_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not wait:
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    answer = sock.recv(64)
                    # +PONG, or -NOAUTH from a server that wants a password: either way it is up.
                    if answer.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("own redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@asynccontextmanager
async def provider(handler: Any) -> AsyncIterator[str]:
    """A one-route chat-completions provider of the test's own, on a real socket; yields its /v1 URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
