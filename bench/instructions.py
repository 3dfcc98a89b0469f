"""Instructions per request: the CPU cost of a target, counted by callgrind instead of timed.

On a shared host a timed figure moves from run to run (the same commit measured
275 and 401 CPU µs per request in consecutive runs), so a one-change A/B cannot
be read from it. Valgrind's callgrind counts the instructions the target
executes, which repeat to within a percent whatever else the machine is doing.
This measures, per target, the instructions of ``--requests`` JSON chat
requests sent by ``--connections`` concurrent clients, after a warm-up, with
collection switched on only around the measured requests::

    python -m bench.instructions --targets passthrough,governed --requests 2000

It prints instructions per request and the ratio to the first target. The
target runs ~50× slower under valgrind, so this is a cost figure (what one
request costs the CPU under load), never a latency or throughput one; the
timed figures stay in ``bench.run``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from .profiles import (
    PROFILES,
    REDIS_URL,
    REPO,
    Proc,
    Profile,
    Tenant,
    free_port,
    gateway_config,
    request_body,
    start_mock,
    wait_http,
)

JSON_TOKENS = 16


async def _load(url: str, body: bytes, headers: dict[str, str], requests: int, connections: int) -> int:
    """Send `requests` POSTs from `connections` clients; returns how many answered 200."""
    ok = 0
    left = requests
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as client:

        async def worker() -> None:
            nonlocal ok, left
            while left > 0:
                left -= 1
                async with client.post(url, data=body, headers={**headers, "Content-Type": "application/json"}) as resp:
                    await resp.read()
                    ok += resp.status == 200

        await asyncio.gather(*(worker() for _ in range(connections)))
    return ok


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _total(out_dir: Path) -> int:
    """Sum of the instruction totals of every dump callgrind wrote."""
    total = 0
    for path in out_dir.glob("callgrind.out*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total += int(line.split()[1])
                break
    return total


class CallgrindProc(Proc):
    """A target process run under ``valgrind --tool=callgrind``, collection off until switched on."""

    def __init__(self, name: str, argv: list[str], out_dir: Path, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        tool = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_dir}/callgrind.out.%p"]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen([*tool, sys.executable, *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.popen.pid


def gateway_profile(name: str, upstream: str, tenant: Tenant, work: Path) -> tuple[Profile, int, Path]:
    """A gateway profile by name, a free port for it and its config file, written in `work`."""
    profile = next(p for p in PROFILES if p.name == name)
    if profile.pipeline is None:
        raise SystemExit(f"{name}: not a gateway profile")
    port = free_port()
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(gateway_config(port, upstream, profile.pipeline, REDIS_URL, tenant.prefix, profile.units)))
    return profile, port, config


async def measure(name: str, upstream: str, tenant: Tenant, work: Path, requests: int, connections: int) -> tuple[int, int]:
    """(instructions per request, requests answered 200) of one profile."""
    profile, port, config = gateway_profile(name, upstream, tenant, work)
    out_dir = work / f"cg-{name}"
    out_dir.mkdir()
    proc = CallgrindProc(name, ["-m", "proxy", "serve", "--config", str(config)], out_dir, work)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/healthz", proc, timeout=300)
        headers = {"Authorization": f"Bearer {tenant.key}"} if profile.governed else {}
        body = request_body(profile.path, False, JSON_TOKENS)
        await _load(base + profile.path, body, headers, 200, connections)  # warm-up: caches, pools, JIT-free paths
        await asyncio.sleep(1.0)  # deferred settlements of the warm-up
        _callgrind(proc.pid, "--zero")
        _callgrind(proc.pid, "--instr=on")
        ok = await _load(base + profile.path, body, headers, requests, connections)
        await asyncio.sleep(0.5)  # their deferred settlements belong to them
        _callgrind(proc.pid, "--dump")
        _callgrind(proc.pid, "--instr=off")
        deadline = time.monotonic() + 60
        while not _total(out_dir) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return _total(out_dir) // max(ok, 1), ok
    finally:
        proc.stop()


async def main_async(args: argparse.Namespace) -> int:
    names = args.targets.split(",")
    work = Path(tempfile.mkdtemp(prefix="sovereign-cg-"))
    mock, upstream = start_mock(work, JSON_TOKENS, None)
    tenant = Tenant(REDIS_URL)
    results: list[tuple[str, int, int]] = []
    try:
        await wait_http(upstream + "/healthz", mock)
        await tenant.create()
        for name in names:
            per_request, ok = await measure(name, upstream, tenant, work, args.requests, args.connections)
            results.append((name, per_request, ok))
            print(f"{name:<16} {per_request:>12,} instructions/request ({ok}/{args.requests} answered 200)", flush=True)
    finally:
        mock.stop()
        await tenant.cleanup()
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for path in work.glob("cg-*/callgrind.out*"):
                shutil.move(str(path), Path(args.keep) / f"{path.parent.name[3:]}.{path.name}")
        shutil.rmtree(work, ignore_errors=True)
    if len(results) > 1:
        base_name, base, _ = results[0]
        for name, per_request, _ in results[1:]:
            print(f"{name} / {base_name}: {per_request / base:.3f}")
    return 0 if all(ok == args.requests for _, _, ok in results) else 1


def main(argv: list[str] | None = None) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench.instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="passthrough,governed", help="comma-separated gateway profiles (the first is the ratios' base)")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per target")
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients")
    parser.add_argument("--keep", metavar="DIR", help="keep callgrind's output files here (for callgrind_annotate)")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
