"""Where a target's CPU goes, per request and per function: py-spy under the throughput load.

`bench.instructions` says how much one request costs and `bench.run` how fast a
target serves; this says where the difference between two targets sits. Each
target runs pinned to core 0 under `wrk -c64` (as in ``throughput_64c``, the load
and a Redis of its own on core 1) while
``py-spy record`` samples it; every function's *own* samples (the innermost
frame of a stack, C calls it makes included) are turned into microseconds per
request, and the table is sorted by the difference against the first target::

    python -m bench.profile --targets passthrough,governed --seconds 15

A sample is one stack every ``1/--rate`` s of the process's busy time, so a
function's figure is its share of the process's CPU over the requests served
in the window (wrk's rate × the window): a sampling estimate, good to a few
tenths of a microsecond at the defaults, not a count. Lines and stacks: the
raw files (py-spy's collapsed format) are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .profiles import (
    LOAD_CORE,
    PROFILES,
    REDIS_URL,
    REPO,
    TARGET_CORE,
    Tenant,
    can_pin,
    request_body,
    start_mock,
    start_store,
    start_target,
    wait_http,
)
from .wrk import ensure_wrk, lua_script, run

WARM_UP_SECONDS = 2
_LINE = re.compile(r":\d+\)$")  # "fn (file.py:123)" -> "fn (file.py)"


@dataclass
class Samples:
    """One target's samples: each function's own count, the total, and the requests they cover."""

    target: str
    own: Counter[str]
    samples: int
    requests: float
    rate: int

    def us_per_request(self, samples: float) -> float:
        return samples / self.rate / self.requests * 1e6 if self.requests else 0.0

    @property
    def total_us(self) -> float:
        return self.us_per_request(self.samples)


def own_samples(collapsed: str) -> tuple[Counter[str], int]:
    """Each function's own samples (its frame innermost) from py-spy's collapsed output, lines merged."""
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = _LINE.sub(")", stack.rsplit(";", 1)[-1])
        own[leaf] += int(count)
        total += int(count)
    return own, total


def by_module(own: Counter[str]) -> Counter[str]:
    """The same samples summed per source file ("fn (file.py)" -> "file.py")."""
    modules: Counter[str] = Counter()
    for function, count in own.items():
        start = function.rfind(" (")
        modules[function[start + 2 : -1] if start >= 0 else function] += count
    return modules


def difference_table(base: Samples, other: Samples, rows: int, modules: bool = False) -> list[str]:
    """Lines of a table: µs per request in `base`, in `other`, and the difference, largest first."""
    a = by_module(base.own) if modules else base.own
    b = by_module(other.own) if modules else other.own
    diffs = sorted(
        ((other.us_per_request(b[k]) - base.us_per_request(a[k]), k) for k in set(a) | set(b)), reverse=True
    )
    head = "module" if modules else "function (own time: its frame innermost)"
    lines = [f"{base.target:>12} {other.target:>12} {'diff':>8}  {head}  [µs per request]"]
    for diff, key in diffs[:rows]:
        lines.append(f"{base.us_per_request(a[key]):12.2f} {other.us_per_request(b[key]):12.2f} {diff:+8.2f}  {key}")
    lines.append(f"{base.total_us:12.2f} {other.total_us:12.2f} {other.total_us - base.total_us:+8.2f}  (all samples)")
    return lines


def py_spy() -> str | None:
    """py-spy beside this interpreter (the venv's, when run without it on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def profile_target(
    name: str, upstream: str, store_url: str, tenant: Tenant, work: Path, wrk: str, spy_path: str, seconds: int, rate: int, out: Path
) -> Samples:
    """Start `name`, load it with wrk and record it with py-spy for `seconds` in the middle of the load."""
    profile = next(p for p in PROFILES if p.name == name)
    if profile.pipeline is None or profile.workers > 1:
        raise SystemExit(f"{name}: only single-process gateway profiles can be profiled")
    pinned = can_pin()
    proc, base = start_target(profile, upstream, work, TARGET_CORE if pinned else None, store_url, tenant.prefix)
    try:
        await wait_http(base + "/healthz", proc)
        headers = {"Authorization": f"Bearer {tenant.key}"} if profile.governed else {}
        script = work / f"{name}.lua"
        script.write_text(lua_script(request_body(profile.path, False, 16), headers))
        load_core = LOAD_CORE if pinned else None
        await run(wrk, base + profile.path, script, 64, WARM_UP_SECONDS, load_core)
        raw = out / f"profile-{name}.txt"
        load = asyncio.ensure_future(run(wrk, base + profile.path, script, 64, seconds + 2 * WARM_UP_SECONDS, load_core))
        await asyncio.sleep(WARM_UP_SECONDS)
        spy = await asyncio.create_subprocess_exec(
            spy_path, "record", "--pid", str(proc.pid), "--duration", str(seconds), "--rate", str(rate),
            "--format", "raw", "--nonblocking", "--output", str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await spy.communicate()
        report = await load
        if spy.returncode != 0 or not raw.exists():
            raise SystemExit(f"py-spy failed on {name}: {err.decode(errors='replace').strip()[-500:]}")
        if report.non_2xx or report.socket_errors:
            raise SystemExit(f"{name}: the load failed ({report.non_2xx} non-2xx, {report.socket_errors} socket errors)")
        own, samples = own_samples(raw.read_text())
        return Samples(name, own, samples, report.rps * seconds, rate)
    finally:
        proc.stop()


async def main_async(args: argparse.Namespace, spy_path: str) -> int:
    wrk, note = ensure_wrk()
    if wrk is None:
        print(note, file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sovereign-profile-"))
    load_core = LOAD_CORE if can_pin() else None
    mock, upstream = start_mock(work, 16, load_core)
    store = None
    tenant: Tenant | None = None
    profiles: list[Samples] = []
    try:
        store = await start_store(work, load_core)  # as in bench.run: off the target's core
        store_url = store[1] if store is not None else REDIS_URL
        await wait_http(upstream + "/healthz", mock)
        tenant = Tenant(store_url)
        await tenant.create()
        for name in args.targets.split(","):
            profiles.append(await profile_target(name, upstream, store_url, tenant, work, wrk, spy_path, args.seconds, args.rate, out))
            print(f"{name}: {profiles[-1].samples} samples, ~{profiles[-1].requests:,.0f} requests", flush=True)
    finally:
        mock.stop()
        if tenant is not None:
            await tenant.cleanup()
        if store is not None:
            store[0].stop()
        shutil.rmtree(work, ignore_errors=True)
    for other in profiles[1:]:
        print()
        print("\n".join(difference_table(profiles[0], other, args.modules, modules=True)))
        print()
        print("\n".join(difference_table(profiles[0], other, args.rows)))
    print(f"\nraw stacks: {', '.join(str(out / f'profile-{p.target}.txt') for p in profiles)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    spy_path = py_spy()
    if spy_path is None:
        print("bench.profile needs py-spy (pip install py-spy; the dev extra has it)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="passthrough,governed", help="comma-separated gateway profiles (the first is the base)")
    parser.add_argument("--seconds", type=int, default=15, help="sampling window per target")
    parser.add_argument("--rate", type=int, default=400, help="samples per second")
    parser.add_argument("--rows", type=int, default=40, help="functions shown per comparison")
    parser.add_argument("--modules", type=int, default=15, help="modules shown per comparison")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="where the raw stacks go")
    return asyncio.run(main_async(parser.parse_args(argv), spy_path))


if __name__ == "__main__":
    sys.exit(main())
