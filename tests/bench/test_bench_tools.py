"""The bench's own Redis and the profile tools work on the real things: a redis-server, py-spy and the opcode trace on a live process.

No timing assertions: these prove that what `bench.run`, `bench.profile` and
`bench.opcodes` read (the store's answers and CPU time, py-spy's samples, the
traced counts) is read correctly.
"""

from __future__ import annotations

import asyncio
import pickle
import shutil
import signal
import subprocess
import sys
from collections import Counter

import aiohttp
import pytest

from bench.opcodes import difference
from bench.profile import Samples, by_module, difference_table, own_samples, py_spy
from bench.profiles import Proc, free_port, start_store, wait_http, wait_store

# A process that spends its time in one function of its own, then sleeps.
BUSY = """
import time
def spin_here():
    end = time.monotonic() + 30
    while time.monotonic() < end:
        sum(range(1000))
spin_here()
"""


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
async def test_own_store_answers_reports_cpu_and_stops(tmp_path):
    started = await start_store(tmp_path, None)
    assert started is not None
    proc, url = started
    try:
        host, port = url.removeprefix("redis://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        for _ in range(2000):
            writer.write(b"INCR bench-counter\r\n")
        await writer.drain()
        last = b""
        for _ in range(2000):
            last = await reader.readline()
        writer.close()
        assert last == b":2000\r\n"  # a fresh server of its own, nothing from elsewhere
        assert proc.cpu_seconds() >= 0 and proc.rss_mb() > 1
    finally:
        proc.stop()
    assert not proc.alive()


async def test_a_store_that_never_answers_is_reported(tmp_path):
    proc = Proc("silent", ["-c", "import time; time.sleep(30)"], None, tmp_path)
    try:
        with pytest.raises(RuntimeError, match="no answer"):
            await wait_store("redis://127.0.0.1:9", proc, timeout=0.3)  # port 9 (discard): nothing listens
    finally:
        proc.stop()


def test_py_spy_samples_of_a_live_process_name_its_busy_function(tmp_path):
    spy = py_spy()
    assert spy is not None, "py-spy comes with the dev extra"
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    raw = tmp_path / "busy.txt"
    try:
        subprocess.run(
            [spy, "record", "--pid", str(busy.pid), "--duration", "1", "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(raw)],
            check=True, capture_output=True, timeout=60,
        )
    finally:
        busy.kill()
        busy.wait()
    own, total = own_samples(raw.read_text())
    assert total > 50  # ~200 over the second
    top, count = own.most_common(1)[0]
    assert top == "spin_here (<string>)" and count > total / 2  # the line numbers are merged away
    assert by_module(own)["<string>"] >= count


def test_difference_table_turns_samples_into_microseconds_per_request():
    # 1,000 samples/s over 100 requests: a sample is 10 µs of a request.
    base = Samples("base", Counter({"shared (a.py)": 50, "old (a.py)": 10}), 60, 100, 1000)
    other = Samples("other", Counter({"shared (a.py)": 50, "unit (b.py)": 30}), 80, 100, 1000)
    lines = difference_table(base, other, rows=2)
    assert lines[1].split() == ["0.00", "300.00", "+300.00", "unit", "(b.py)"]
    assert lines[2].split() == ["500.00", "500.00", "+0.00", "shared", "(a.py)"]  # the largest differences first
    assert lines[-1].split()[:3] == ["600.00", "800.00", "+200.00"]  # every sample, however many rows are shown
    modules = difference_table(base, other, rows=5, modules=True)
    assert [line.split()[-1] for line in modules[1:-1]] == ["b.py", "a.py"]
    assert modules[2].split()[:3] == ["600.00", "500.00", "-100.00"]


async def test_opcode_trace_of_a_live_cli_counts_only_between_its_signals(tmp_path):
    # The traced entry point runs any `sovereign` subcommand; the simulated provider is the smallest.
    port = free_port()
    out = tmp_path / "counts"
    proc = Proc("mock", ["-m", "bench.opcodes", "--trace-into", str(out), "--", "mock-upstream", "--port", str(port)], None, tmp_path)
    base = f"http://127.0.0.1:{port}"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    async def chat(client: aiohttp.ClientSession, times: int) -> None:
        for _ in range(times):
            async with client.post(base + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()

    try:
        await wait_http(base + "/v1/models", proc)
        async with aiohttp.ClientSession() as client:
            await chat(client, 5)  # before counting: not in the counts
            proc.popen.send_signal(signal.SIGUSR1)
            await asyncio.sleep(0.3)
            await chat(client, 7)
            await asyncio.sleep(0.3)
            proc.popen.send_signal(signal.SIGUSR2)
            for _ in range(50):
                if out.exists() and out.stat().st_size:
                    break
                await asyncio.sleep(0.1)
            await chat(client, 3)  # after: not either
    finally:
        proc.stop()
    opcodes, calls = pickle.loads(out.read_bytes())
    handler = next(key for key in calls if key[1] == "_chat_completions")
    assert handler[0].endswith("proxy/devtools/mock_upstream.py")
    assert calls[handler] == 7  # the seven requests between the signals, none of the eight others
    assert opcodes[handler] > 7 * 10


def test_opcode_difference_is_per_request_largest_first():
    base = ({("a.py", "shared"): 1000, ("a.py", "old"): 100}, {("a.py", "shared"): 10, ("a.py", "old"): 10})
    other = ({("a.py", "shared"): 1000, ("b.py", "unit"): 3000, ("b.py", "small"): 500}, {("a.py", "shared"): 10, ("b.py", "unit"): 10, ("b.py", "small"): 10})
    lines = difference(base, other, requests=10, rows=4)
    assert lines[1].split() == ["+300.0", "+1.00", "b.py:unit"]
    assert lines[2].split() == ["+50.0", "+1.00", "b.py:small"]
    assert "a.py:shared" not in "\n".join(lines)  # unchanged: not shown
    assert lines[-2:] == ["  (fewer)", "    -10.0   -1.00  a.py:old"]
