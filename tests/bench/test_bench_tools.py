"""The bench's own Redis and the profile tool work on the real things: a redis-server, py-spy on a live process.

No timing assertions: these prove that what `bench.run` and `bench.profile`
read (the store's answers and CPU time, py-spy's samples) is read correctly.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from bench.profile import Samples, by_module, difference_table, own_samples, py_spy
from bench.profiles import Proc, start_store, wait_store

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
