"""`sovereign serve --workers N`: real supervisor and worker processes on one port, sharing the real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.settings import ConfigError, deep_merge, load_settings
from proxy.web.workers import WORKER_HEADER
from tests.support import REDIS_URL, Process, free_port, settings_data, until

BODY = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "which worker?"}]}
STREAM = {**BODY, "stream": True}


def gateway_data(mock_url: str, prefix: str, **overrides: Any) -> dict[str, Any]:
    data = settings_data(mock_url, store_url=REDIS_URL, prefix=prefix, admin_token=None)
    return deep_merge(data, {"logging": {"level": "info"}, **overrides})


async def spawn_workers(data: dict[str, Any], tmp_path: Path, workers: str = "2") -> tuple[Process, str]:
    """`sovereign serve --workers N`, returned once the supervisor reports every worker listening."""
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = Process(["serve", "--config", str(config), "--workers", workers], log_path=tmp_path / "gw.log")
    try:
        await until(lambda: "workers.ready" in proc.output() or proc.proc.poll() is not None, timeout=60)
    except TimeoutError:
        proc.stop()
        raise
    if proc.proc.poll() is not None:
        raise RuntimeError(f"supervisor exited early:\n{proc.output()[-3000:]}")
    ready = re.search(r'"address":"(http://[^"]+)","pids"', proc.output())
    assert ready is not None, proc.output()
    return proc, ready.group(1)


def log_events(proc: Process) -> list[dict[str, Any]]:
    """The JSON log lines of the supervisor and its workers (they share its stdout)."""
    return [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def served_by(url: str, count: int, **kwargs: Any) -> list[str]:
    """`count` requests, each on a new connection (the kernel picks a worker per connection); the serving pids."""
    pids = []
    for _ in range(count):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.request(kwargs.get("method", "POST"), url, json=kwargs.get("json"), headers=kwargs.get("headers")) as resp:
                assert resp.status == kwargs.get("status", 200), await resp.text()
                await resp.read()
                pids.append(resp.headers[WORKER_HEADER])
    return pids


async def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _counted(base: str, requests: int, timeout: float = 10.0) -> None:
    """Until /metrics counts `requests` chat requests (or the timeout; the caller asserts)."""
    deadline = time.monotonic() + timeout
    while chat_requests(await scrape(base)) < requests and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def chat_requests(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], status: str = "200") -> float:
    labels = (("model", "sovereign-alpha"), ("route", "/v1/chat/completions"), ("status", status))
    return metrics.get(("sovereign_requests_total", labels), 0.0)


async def test_two_workers_serve_one_port_share_the_store_and_sum_their_metrics(mock, redis_prefix, shared_store, tmp_path):
    from proxy.store.accounts import Accounts

    accounts = Accounts(shared_store)
    await accounts.create_tenant("acme", 1_000_000)
    key, _ = await accounts.create_key("acme")
    port = free_port()
    proc, base = await spawn_workers(gateway_data(mock.url, redis_prefix, server={"port": port, "host": "127.0.0.1"}, pipeline=["auth"]), tmp_path)
    try:
        assert base == f"http://127.0.0.1:{port}"
        # The key lives in Redis: every worker accepts it, and a wrong one is refused by every worker.
        pids = await served_by(base + "/v1/chat/completions", 24, json=BODY, headers={"Authorization": f"Bearer {key}"})
        assert len(set(pids)) == 2, pids
        assert {parent_of(int(pid)) for pid in pids} == {proc.proc.pid}  # both are the supervisor's workers
        refused = await served_by(base + "/v1/chat/completions", 8, json=BODY, headers={"Authorization": "Bearer sk-sov-live-nope"}, status=401)
        assert len(refused) == 8
        # Whichever worker answers /metrics, it reports the sum over both (the access logger counts after the response).
        deadline = time.monotonic() + 10
        while chat_requests(await scrape(base)) < 24 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        seen = set()
        for _ in range(8):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                async with session.get(base + "/metrics") as resp:
                    seen.add(resp.headers[WORKER_HEADER])
                    text = await resp.text()
            assert 'sovereign_requests_total{model="sovereign-alpha",route="/v1/chat/completions",status="200"} 24.0' in text
            assert 'sovereign_requests_total{model="sovereign-alpha",route="/v1/chat/completions",status="401"} 8.0' in text
            assert "sovereign_open_streams 0.0" in text
        assert len(mock.requests) == 24
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        proc.stop()


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_zero(mock, redis_prefix, tmp_path):
    # What a supervisor killed with SIGKILL leaves behind: its metrics directory, named with its pid.
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"sovereign-metrics-{gone.pid}-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    data = gateway_data(mock.url, redis_prefix, server={"port": free_port(), "host": "127.0.0.1", "drain_seconds": 20})
    proc, base = await spawn_workers(data, tmp_path)
    assert not stale.exists()  # swept by the next supervisor
    sessions: list[aiohttp.ClientSession] = []
    try:
        # Paced streams (25 chunks, 100 ms apart: about 2.5 s), each on its own connection, until both workers hold some.
        streams: dict[str, list[aiohttp.ClientResponse]] = {}
        while len(streams) < 2 or sum(map(len, streams.values())) < 4:
            session = aiohttp.ClientSession()
            sessions.append(session)
            stream = await session.post(base + "/v1/chat/completions", json=STREAM, headers={"x-mock-chunks": "25", "x-mock-delay-ms": "100"})
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
            streams.setdefault(stream.headers[WORKER_HEADER], []).append(stream)
        opened = sum(map(len, streams.values()))
        # The open-streams gauge is the sum over the live workers.
        assert ("sovereign_open_streams", ()) in (metrics := await scrape(base)) and metrics[("sovereign_open_streams", ())] == opened
        async with aiohttp.ClientSession() as session:
            async with session.post(mock.url + "/chat/completions", json=STREAM, headers={"x-mock-chunks": "25"}) as resp:
                events = (await resp.read()).count(b"data: ")  # what a whole stream holds
        sent_at = time.monotonic()
        proc.signal(signal.SIGTERM)
        # Every worker drains: new connections, whichever worker takes them, get 503 draining; readiness fails.
        draining: set[str] = set()
        deadline = time.monotonic() + 10
        while draining != set(streams) and time.monotonic() < deadline:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                async with session.post(base + "/v1/chat/completions", json=BODY) as resp:
                    if resp.status == 503 and (await resp.json())["error"]["code"] == "draining":
                        draining.add(resp.headers[WORKER_HEADER])
        assert draining == set(streams)  # both workers are draining
        for _ in range(6):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                async with session.post(base + "/v1/chat/completions", json=BODY) as resp:
                    assert resp.status == 503 and (await resp.json())["error"]["code"] == "draining"
                async with session.get(base + "/readyz") as ready:
                    assert ready.status == 503 and "draining" in (await ready.json())["reasons"]
        for pid, open_streams in streams.items():
            for stream in open_streams:
                rest = await stream.read()
                # Every open stream, through each worker, completed: all of its events after the first one read.
                assert rest.endswith(b"data: [DONE]\n\n") and rest.count(b"data: ") == events - 1, pid
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0, proc.output()[-3000:]
        assert time.monotonic() - sent_at < 20
        events = log_events(proc)
        assert sorted(e["worker"] for e in events if e["event"] in ("gateway.draining", "gateway.stopped")) == [0, 0, 1, 1]
        assert [e["exits"] for e in events if e["event"] == "workers.stopped"] == [{"0": "code 0", "1": "code 0"}]
        # The supervisor removed its private metrics directory.
        (directory,) = [e["metrics_dir"] for e in events if e["event"] == "workers.starting"]
        assert directory and not Path(directory).exists()
    finally:
        for session in sessions:
            await session.close()
        proc.stop()


async def test_a_worker_that_dies_is_reported_and_replaced_on_a_port_picked_once(mock, redis_prefix, tmp_path):
    """server.port 0: the supervisor picks one port for all workers; a killed worker's slot gets a new process."""
    proc, base = await spawn_workers(gateway_data(mock.url, redis_prefix, server={"port": 0, "host": "127.0.0.1"}), tmp_path)
    try:
        first = await served_by(base + "/v1/chat/completions", 16, json=BODY)
        assert len(set(first)) == 2
        # A request is counted just after its response is written: wait until all 16 are,
        # or the kill could land between a reply and its count.
        await _counted(base, 16)
        victim = int(first[0])
        os.kill(victim, signal.SIGKILL)
        await until(lambda: '"worker.restarted"' in proc.output(), timeout=60)
        exited = [e for e in log_events(proc) if e["event"] == "worker.exited"]
        assert [(e["pid"], e["exit"], e["level"]) for e in exited] == [(victim, "signal SIGKILL", "error")]
        after = await served_by(base + "/v1/chat/completions", 16, json=BODY)
        assert len(set(after)) == 2 and str(victim) not in after
        assert {parent_of(int(pid)) for pid in after} == {proc.proc.pid}
        # Counters keep what the dead worker counted; the sum covers all 32 requests.
        await _counted(base, 32)
        assert chat_requests(await scrape(base)) == 32
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        proc.stop()


async def test_a_worker_that_cannot_start_fails_the_whole_start_with_its_exit_code(mock, redis_prefix, tmp_path):
    """The port is held by a process without SO_REUSEPORT: no worker can bind it, and retrying would not help."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        data = gateway_data(mock.url, redis_prefix, server={"port": holder.getsockname()[1], "host": "127.0.0.1"})
        config = tmp_path / "gw.yaml"
        config.write_text(yaml.safe_dump(data))
        proc = Process(["serve", "--config", str(config), "--workers", "2"], log_path=tmp_path / "gw.log")
        try:
            code = await asyncio.to_thread(proc.wait, 60)
        finally:
            proc.stop()
    finally:
        holder.close()
    events = log_events(proc)
    failed = [e for e in events if e["event"] == "worker.failed_to_start"]
    assert failed and failed[0]["level"] == "error", proc.output()[-3000:]
    assert code != 0 and failed[0]["exit"] == f"code {code}"  # the worker's own exit code, passed on
    assert not any(e["event"] in ("workers.ready", "worker.restarted") for e in events)


async def test_memory_store_with_two_workers_is_refused_at_start_in_one_line(mock, tmp_path):
    data = settings_data(mock.url, store_url="memory://", admin_token=None, server={"port": free_port(), "host": "127.0.0.1"})
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump(data))
    cases = {
        "flag": (["serve", "--config", str(config), "--workers", "2"], {}),
        "env": (["check-config", "--config", str(config)], {"SOVEREIGN_SERVER__WORKERS": "2"}),
    }
    procs = {name: Process(args, env=env, log_path=tmp_path / f"{name}.log") for name, (args, env) in cases.items()}
    try:
        codes = {name: await asyncio.to_thread(proc.wait, 60) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()
    assert codes == dict.fromkeys(cases, 2)
    refusal = (
        "sovereign: server.workers: 2 workers need a shared store, but store.url is memory://,"
        " which lives inside one process; use a redis:// store or run one worker"
    )
    assert [procs[name].output().strip() for name in cases] == [refusal] * 2


def test_worker_counts_auto_is_the_cpus_this_process_may_use():
    assert load_settings(overrides={"server": {"workers": "auto"}}).server.workers == len(os.sched_getaffinity(0))
    assert load_settings(env={"SOVEREIGN_SERVER__WORKERS": "3"}).server.workers == 3
    assert load_settings(env={}).server.workers == 1
    for bad, message in (("none", "Input should be a valid integer"), (0, "greater than or equal to 1")):
        with pytest.raises(ConfigError, match=f"server.workers: .*{message}"):
            load_settings(overrides={"server": {"workers": bad}})


async def test_one_worker_is_the_plain_single_process(passthrough):
    """The default adds nothing: no worker header, metrics from the gateway's own registry."""
    async with aiohttp.ClientSession() as session:
        async with session.post(passthrough.v1 + "/chat/completions", json=BODY) as resp:
            assert resp.status == 200 and WORKER_HEADER not in resp.headers
    metrics = passthrough.gateway.metrics
    assert metrics.exposed is metrics.registry and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
