"""Bytecodes per request, per function: where a target's Python work is, counted, not sampled.

`bench.instructions` counts what a request costs the CPU (callgrind) but
cannot say which Python function spends it; `bench.profile` can, by sampling,
to a few tenths of a microsecond. This counts: each target runs under a trace
function (``sys.settrace`` with opcode events) switched on around the measured
requests only, and prints the bytecodes every Python function executed per
request, sorted by the difference against the first target::

    python -m bench.opcodes --targets passthrough,governed --requests 300

Counts repeat exactly from run to run (up to the background loops, whose
iterations depend on time: the lease flush, the sweeper), so a one-line change
shows as the opcodes it adds or removes. What they do not weigh is C: a call
into orjson, hashlib or the event loop is one opcode however long it takes,
and so is a coroutine switch. Use it to find the Python to cut, and
`bench.instructions` to see what cutting it saved. The trace slows the target
~100×, so this is never a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import pickle
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from .instructions import JSON_TOKENS, _load, gateway_profile
from .profiles import REDIS_URL, REPO, Proc, Tenant, request_body, start_mock, wait_http

Counts = dict[tuple[str, str], int]


# -- inside the target: `python -m bench.opcodes --trace-into FILE -- serve …` -----
def traced_serve(out: str, argv: list[str]) -> int:
    """Run the gateway CLI with `argv`; SIGUSR1 starts counting, SIGUSR2 writes the counts to `out`."""
    opcodes: collections.Counter[tuple[str, str]] = collections.Counter()
    calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        code = frame.f_code
        calls[(code.co_filename, code.co_name)] += 1  # a coroutine counts once per resumption
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return on_opcode

    def on_opcode(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            opcodes[(code.co_filename, code.co_name)] += 1
        return on_opcode

    def start(*_: Any) -> None:
        opcodes.clear()
        calls.clear()
        sys.settrace(on_call)  # frames started from here on; the loop's own frame is C

    def stop(*_: Any) -> None:
        sys.settrace(None)
        with open(out, "wb") as f:
            pickle.dump((dict(opcodes), dict(calls)), f)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from proxy.cli import main

    return main(argv)


# -- the harness -------------------------------------------------------------
async def measure(name: str, upstream: str, tenant: Tenant, work: Path, requests: int, connections: int) -> tuple[Counts, Counts, int]:
    """(opcodes, calls) per function over `requests` requests of one profile, and how many answered 200."""
    profile, port, config = gateway_profile(name, upstream, tenant, work)
    out = work / f"{name}.counts"
    proc = Proc(name, ["-m", "bench.opcodes", "--trace-into", str(out), "--", "serve", "--config", str(config)], None, work)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/healthz", proc)
        headers = {"Authorization": f"Bearer {tenant.key}"} if profile.governed else {}
        body = request_body(profile.path, False, JSON_TOKENS)
        await _load(base + profile.path, body, headers, 300, connections)  # warm-up: caches, pools, a lease
        await asyncio.sleep(1.0)  # deferred settlements of the warm-up
        proc.popen.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.3)
        ok = await _load(base + profile.path, body, headers, requests, connections)
        await asyncio.sleep(0.5)  # their deferred settlements belong to them
        proc.popen.send_signal(signal.SIGUSR2)
        for _ in range(100):
            if out.exists() and out.stat().st_size:
                break
            await asyncio.sleep(0.1)
        with open(out, "rb") as f:
            opcodes, calls = pickle.load(f)
        return opcodes, calls, ok
    finally:
        proc.stop()


def _where(key: tuple[str, str]) -> str:
    path, function = key
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for prefix in (f"{REPO}/.venv/lib/{version}/site-packages/", f"{REPO}/", f"{sys.base_prefix}/lib/{version}/"):
        path = path.removeprefix(prefix)
    return f"{path}:{function}"


def difference(base: tuple[Counts, Counts], other: tuple[Counts, Counts], requests: int, rows: int) -> list[str]:
    """Lines of the per-request difference `other` − `base`, largest first, then the largest decreases."""
    (base_ops, base_calls), (ops, calls) = base, other
    keys = set(base_ops) | set(ops)
    diff = sorted(((ops.get(k, 0) - base_ops.get(k, 0)) / requests, (calls.get(k, 0) - base_calls.get(k, 0)) / requests, k) for k in keys)
    lines = [f"{'opcodes':>9} {'calls':>7}  function  [per request]"]
    lines += [f"{d:+9.1f} {c:+7.2f}  {_where(k)}" for d, c, k in reversed(diff[-rows:]) if d > 0]
    fewer = [f"{d:+9.1f} {c:+7.2f}  {_where(k)}" for d, c, k in diff[: max(rows // 4, 1)] if d < 0]
    if fewer:
        lines += ["  (fewer)"] + fewer
    return lines


async def main_async(args: argparse.Namespace) -> int:
    names = args.targets.split(",")
    work = Path(tempfile.mkdtemp(prefix="sovereign-opcodes-"))
    mock, upstream = start_mock(work, JSON_TOKENS, None)
    tenant = Tenant(REDIS_URL)
    results: list[tuple[str, tuple[Counts, Counts], int]] = []
    try:
        await wait_http(upstream + "/healthz", mock)
        await tenant.create()
        for name in names:
            opcodes, calls, ok = await measure(name, upstream, tenant, work, args.requests, args.connections)
            results.append((name, (opcodes, calls), ok))
            total = sum(opcodes.values()) / args.requests
            print(f"{name:<16} {total:>9,.0f} opcodes/request, {sum(calls.values()) / args.requests:,.0f} calls ({ok}/{args.requests} answered 200)", flush=True)
    finally:
        mock.stop()
        await tenant.cleanup()
    base_name, base, _ = results[0]
    for name, counts, _ in results[1:]:
        print(f"\n{name} − {base_name}")
        print("\n".join(difference(base, counts, args.requests, args.rows)))
    return 0 if all(ok == args.requests for _, _, ok in results) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trace-into"]:
        return traced_serve(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench.opcodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="passthrough,governed", help="comma-separated gateway profiles (the first is the base)")
    parser.add_argument("--requests", type=int, default=300, help="measured requests per target")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients")
    parser.add_argument("--rows", type=int, default=40, help="functions shown per comparison")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
