"""wrk for the throughput workload: install check, the POST script, running it and parsing its report."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_DURATION = re.compile(r"^\s*([\d.]+)(us|ms|s|m)$")


def ensure_wrk() -> tuple[str | None, str]:
    """The wrk binary (installing it with apt-get when root) and a line saying what happened."""
    found = shutil.which("wrk")
    if found:
        return found, f"wrk: {found}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "wrk: not installed and cannot apt-get it; using the asyncio load generator instead"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "install", "-y", "-qq", "wrk"], ["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180, check=False)
        if found := shutil.which("wrk"):
            return found, f"wrk: installed with apt-get ({found})"
    return None, "wrk: apt-get install failed; using the asyncio load generator instead"


def lua_script(body: bytes, headers: dict[str, str]) -> str:
    """A wrk script posting ``body`` with ``headers`` (the body as a Lua long string)."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("body cannot be embedded in the wrk script")
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{text}]==]", 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    return "\n".join(lines) + "\n"


@dataclass
class WrkReport:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


def _ms(text: str) -> float:
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> WrkReport:
    """Parse ``wrk --latency`` output; ValueError when a figure is missing."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (done and rps and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkReport(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sockets.groups()) if sockets else 0,
    )


async def run(wrk: str, url: str, script: Path, connections: int, duration: float, core: int | None) -> WrkReport:
    """Run wrk (one thread, pinned to ``core``) and parse its report."""
    prefix = ["taskset", "-c", str(core)] if core is not None else []
    argv = [*prefix, wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return parse(out.decode(errors="replace"))
