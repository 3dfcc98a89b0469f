"""What is benchmarked: the target profiles, their processes (pinned to a core) and their configs.

Every target and the simulated provider run as their own process, started
through ``taskset -c CORE`` so the target has core 0 to itself while the load
and the provider share core 1. A process's CPU time and RSS are read from
/proc, summed over its children (a ``--workers`` target is a supervisor and
its workers). The workers profile runs unpinned: its workers use every core,
the load's included. The governed profiles get a tenant with plenty of credits and a key,
created with `proxy.store.accounts.Accounts` on the real Redis under a unique prefix
that `Tenant.cleanup` deletes afterwards.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import yaml

from proxy.core.pipeline import registered_units

from .streams import AGENT_SSE, CHAT_SSE, MESSAGES_SSE, RESPONSES_SSE, SSEKind

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("SOVEREIGN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
TARGET_CORE, LOAD_CORE = 0, 1
CHAT_PATH, RESPONSES_PATH = "/v1/chat/completions", "/v1/responses"
MESSAGES_PATH, EMBEDDINGS_PATH = "/v1/messages", "/v1/embeddings"
MODEL = "sovereign-alpha"
AGENT_MODEL = "sovereign-agent"  # the `agent` profile's agent model over MODEL
EMBEDDING_MODEL = "sovereign-embed"
TENANT_CREDITS = 10**12
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def can_pin() -> bool:
    """True when there are two cores to split and taskset to do it."""
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2 and os.cpu_count() >= 2


def _die_with_parent() -> None:
    # A benchmark killed hard must not leave servers behind: the kernel sends
    # SIGKILL to the child when the harness dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Proc:
    """A benchmark server process; ``pid`` is the process itself (taskset execs it).

    `argv` runs under this interpreter unless `program` names another executable.
    """

    def __init__(self, name: str, argv: list[str], core: int | None, log_dir: Path, program: str = sys.executable) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        prefix = ["taskset", "-c", str(core)] if core is not None else []
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [*prefix, program, *argv],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The process and its live descendants (a supervisor's workers), from /proc/<pid>/task/*/children."""
        found, queue = [], [self.pid]
        while queue:
            pid = queue.pop()
            found.append(pid)
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for task in tasks:
                try:
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        queue.extend(int(child) for child in f.read().split())
                except OSError:
                    pass
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and its live children, from /proc/<pid>/stat."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                if pid == self.pid:
                    raise
                continue  # a child that just exited
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return total / _CLK_TCK

    def rss_mb(self) -> float:
        """Resident set size in MB (VmRSS in /proc/<pid>/status), summed over the process and its children."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                if pid == self.pid:
                    raise RuntimeError(f"{self.name}: no VmRSS") from None
        return total / 1024

    async def quiesce(self, idle_ms: float = 5.0, window: float = 0.15, limit: float = 5.0) -> None:
        """Wait until the process is idle (deferred settlements, GC) before the next measurement."""
        deadline = time.monotonic() + limit
        while self.alive() and time.monotonic() < deadline:
            before = self.cpu_seconds()
            await asyncio.sleep(window)
            if (self.cpu_seconds() - before) * 1000 <= idle_ms:
                return

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(3)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(3)


async def wait_http(url: str, proc: Proc, timeout: float = 20.0) -> None:
    """Poll ``url`` until it answers; raise with the log tail if the process dies or it times out."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited (code {proc.popen.returncode}):\n{proc.log_tail()}")
            try:
                async with client.get(url) as resp:
                    await resp.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer at {url} within {timeout:.0f}s:\n{proc.log_tail()}")


# -- request bodies ---------------------------------------------------------------------

_PROMPT = "Say hello to the benchmark, please."


def request_body(path: str, stream: bool, max_tokens: int, model: str = MODEL) -> bytes:
    """The body every target gets for a workload (the gateway maps the public model)."""
    if path == RESPONSES_PATH:
        body: dict[str, Any] = {"model": model, "input": _PROMPT, "max_output_tokens": max_tokens}
    elif path == EMBEDDINGS_PATH:
        return orjson.dumps({"model": EMBEDDING_MODEL, "input": _PROMPT, "encoding_format": "float"})
    elif path == MESSAGES_PATH:
        body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": _PROMPT}]}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": _PROMPT}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


# -- profiles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A benchmark target: ``pipeline`` None means not a gateway (direct, floor)."""

    name: str
    description: str
    pipeline: list[str] | None = None
    units: dict[str, Any] = field(default_factory=dict)  # unit settings (config `units:`)
    path: str = CHAT_PATH
    sse: SSEKind = CHAT_SSE
    workers: int = 1  # `sovereign serve --workers N`; more than one runs unpinned
    workloads: tuple[str, ...] | None = None  # only these workloads (None: all)
    model: str = MODEL

    @property
    def governed(self) -> bool:
        return self.pipeline is not None and "auth" in self.pipeline

    def missing_units(self) -> list[str]:
        """Pipeline units whose module is not in the tree yet."""
        missing = []
        for unit in self.pipeline or []:
            module = registered_units()[unit].partition(":")[0]
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                missing.append(unit)
        return missing


PROFILES = [
    Profile("direct", "the simulated provider itself (baseline for added latency)"),
    Profile("floor", "bench/floor.py: bare aiohttp pass-through (the reference for ratios)"),
    Profile("passthrough", "sovereign serve, pipeline []", pipeline=[]),
    Profile("governed", "sovereign serve, auth + validation + metering on Redis", pipeline=["auth", "validation", "metering"]),
    Profile(
        "governed_strict",
        "governed with speculative_hold: false (every hold confirmed before the provider is called)",
        pipeline=["auth", "validation", "metering"],
        units={"metering": {"speculative_hold": False}},
    ),
    Profile(
        "governed_2w",
        "governed with --workers 2, unpinned (the workers share both cores with the provider and the load)",
        pipeline=["auth", "validation", "metering"],
        workers=2,
        workloads=("throughput_64c",),
    ),
    Profile(
        "responses",
        "governed + responses unit, POST /v1/responses",
        pipeline=["auth", "validation", "responses", "metering"],
        path=RESPONSES_PATH,
        sse=RESPONSES_SSE,
    ),
    Profile(
        "agent",
        "governed + agent unit: one MCP tool call (stdio server, bench/mcp_tools.py) per request, two provider calls",
        pipeline=["auth", "validation", "agent", "metering"],
        sse=AGENT_SSE,
        model=AGENT_MODEL,
        # Not the paced stream workloads: after a tool result the simulated provider answers from
        # the tool's output (a few chunks), so `x-mock-chunks: 50` cannot shape an agent stream.
        workloads=("latency_1c", "throughput_64c"),
    ),
    Profile(
        "messages",
        "governed + messages unit, POST /v1/messages (Anthropic Messages API)",
        pipeline=["auth", "validation", "messages", "metering"],
        path=MESSAGES_PATH,
        sse=MESSAGES_SSE,
    ),
    Profile(
        "embeddings",
        "governed, POST /v1/embeddings (JSON only)",
        pipeline=["auth", "validation", "metering"],
        path=EMBEDDINGS_PATH,
        workloads=("latency_1c", "throughput_64c"),  # JSON only: embeddings have no streams
    ),
]


def gateway_config(
    port: int, upstream_base: str, pipeline: list[str], store_url: str, prefix: str, units: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Settings data of a benchmarked gateway (no access log; metrics stay on)."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "drain_seconds": 1},
        "logging": {"level": "warning", "access_log": False},
        "store": {"url": store_url, "prefix": prefix},
        "upstreams": {"default": {"url": upstream_base + "/v1", "api_key": "sk-bench-upstream-key", "model": "mock-model"}},
        # 1 credit per input token, 2 per output token: every request visibly moves the balance.
        "models": {
            MODEL: {"upstream": "default", "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}},
            EMBEDDING_MODEL: {"upstream": "default", "kind": "embeddings", "price": {"input_per_million": 1_000_000}},
        },
        "pipeline": pipeline,
        "units": units or {},
    }
    if "agent" in pipeline:
        # The simulated provider calls every offered tool until `tool_choice: "none"`, which the
        # second (last) call gets: exactly one tool call per request.
        data["tool_servers"] = {"bench": {"command": [sys.executable, str(REPO / "bench" / "mcp_tools.py")]}}
        data["models"][AGENT_MODEL] = {"agent": {"model": MODEL, "tool_servers": ["bench"], "max_iterations": 2}}
    return data


@dataclass
class Target:
    """A started profile: its process, URL and the headers its requests need."""

    profile: Profile
    proc: Proc
    base: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def url(self) -> str:
        return self.base + self.profile.path


def start_mock(log_dir: Path, chunks: int, core: int | None) -> tuple[Proc, str]:
    port = free_port()
    argv = ["-m", "proxy", "mock-upstream", "--port", str(port), "--chunks", str(chunks)]
    return Proc("mock-upstream", argv, core, log_dir), f"http://127.0.0.1:{port}"


async def start_store(log_dir: Path, core: int | None) -> tuple[Proc, str] | None:
    """The benchmark's own Redis (nothing saved to disk) on `core`, answering; None when redis-server is not installed.

    RuntimeError (with its log) when it does not answer.

    On the load's core, not the target's: the store's work is not the gateway's
    CPU time (in a deployment Redis runs elsewhere), and a shared Redis that the
    scheduler happens to run on the target's core takes that core from it
    (bench/RESULTS.md, "The store on the target's core"). Its own CPU time is
    reported beside the target's (``store CPU µs/req``).
    """
    program = shutil.which("redis-server")
    if program is None:
        return None
    port = free_port()
    argv = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(log_dir)]
    proc, url = Proc("redis", argv, core, log_dir, program=program), f"redis://127.0.0.1:{port}"
    try:
        await wait_store(url, proc)
    except BaseException:
        proc.stop()
        raise
    return proc, url


async def wait_store(url: str, proc: Proc, timeout: float = 10.0) -> None:
    """Wait until the Redis at `url` answers PING."""
    split = urlsplit(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(split.hostname, split.port)
            writer.write(b"PING\r\n")
            answer = await asyncio.wait_for(reader.readline(), 1.0)
            writer.close()
            if answer.startswith(b"+PONG"):
                return
        except (OSError, asyncio.TimeoutError):
            pass
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: no answer at {url} within {timeout:.0f}s:\n{proc.log_tail()}")
        await asyncio.sleep(0.05)


def start_target(profile: Profile, upstream_base: str, log_dir: Path, core: int | None, store_url: str, prefix: str) -> tuple[Proc, str]:
    """Start the process of a non-direct profile; returns it and its base URL."""
    port = free_port()
    if profile.pipeline is None:
        argv = ["-m", "bench.floor", "--port", str(port), "--upstream", upstream_base]
    else:
        config = log_dir / f"{profile.name}.yaml"
        config.write_text(yaml.safe_dump(gateway_config(port, upstream_base, profile.pipeline, store_url, prefix, profile.units)))
        argv = ["-m", "proxy", "serve", "--config", str(config)]
        if profile.workers > 1:
            argv += ["--workers", str(profile.workers)]
            core = None
    return Proc(profile.name, argv, core, log_dir), f"http://127.0.0.1:{port}"


async def wait_workers(url: str, proc: Proc, workers: int, timeout: float = 30.0) -> None:
    """Poll ``url`` on new connections until ``workers`` distinct workers have answered (each names its pid)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: {len(seen)}/{workers} workers answered within {timeout:.0f}s:\n{proc.log_tail()}")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            try:
                async with client.get(url) as resp:
                    await resp.read()
                    seen.add(resp.headers.get("x-sovereign-worker", ""))
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)


class Tenant:
    """The benchmark tenant and key on the real store, under a unique prefix."""

    def __init__(self, store_url: str = REDIS_URL) -> None:
        from proxy.core.settings import StoreSettings
        from proxy.store.store import Store

        self.prefix = f"sovbench-{uuid.uuid4().hex[:10]}"
        self.store_url = store_url
        self.store = Store(StoreSettings(url=store_url, prefix=self.prefix))
        self.tenant = "bench-tenant"
        self.key = ""

    async def create(self) -> None:
        from proxy.store.accounts import Accounts

        await self.store.connect()
        accounts = Accounts(self.store)
        await accounts.create_tenant(self.tenant, TENANT_CREDITS)
        self.key, _ = await accounts.create_key(self.tenant, name="bench")

    async def balance(self) -> int:
        from proxy.store.accounts import Accounts

        return (await Accounts(self.store).tenant(self.tenant))["balance"]

    async def cleanup(self) -> None:
        """Delete every key under the prefix (never more), then disconnect."""
        redis = self.store.redis
        if redis is None:
            return
        try:
            keys = [key async for key in redis.scan_iter(match=f"{self.prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await redis.delete(*keys[i : i + 500])
        finally:
            await self.store.close()
