"""The benchmark runner: ``python -m bench.run [--quick] [--rounds N] [--duration S] [--out PATH]``.

Starts the simulated provider, its own Redis and every available target as
their own processes (targets on core 0; provider, Redis and load on core 1), then runs the
workloads in interleaved rounds (each round visits every target, in a rotated
order), checks correctness inside each workload, prints ratio tables against
the floor and the direct provider, and writes everything as JSON. See
bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from . import report, streams, wrk
from .profiles import (
    LOAD_CORE,
    PROFILES,
    REDIS_URL,
    REPO,
    TARGET_CORE,
    Proc,
    Profile,
    Target,
    Tenant,
    can_pin,
    request_body,
    start_mock,
    start_store,
    start_target,
    wait_http,
    wait_workers,
)

WORKLOADS = ("latency_1c", "throughput_64c", "streams_100x50", "open_streams_1000")
JSON_TOKENS = 16  # content chunks of a JSON reply (mock --chunks) and the request's max_tokens
STREAM_CHUNKS, STREAM_DELAY_MS, STREAM_COUNT = 50, 20, 100
OPEN_STREAMS = 1000
BUSY_PROVIDER_PCT = 90.0  # provider CPU above this means it may be the bottleneck


@dataclass(frozen=True)
class Plan:
    rounds: int
    duration: float  # seconds of each timed workload (1-conn latency and 64-conn throughput) per target
    budget: float  # no new round starts after this many seconds
    profiles: tuple[Profile, ...] = tuple(PROFILES)
    workloads: tuple[str, ...] = WORKLOADS


def plan_from(args: argparse.Namespace) -> Plan:
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (1.0 if args.quick else 6.0)
    return Plan(rounds, duration, 50.0 if args.quick else 420.0, _chosen_profiles(args.targets), _chosen_workloads(args.workloads))


def _names(text: str | None, known: list[str], what: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


REFERENCES = ("direct", "floor", "passthrough")  # every ratio is against one of these


def _chosen_profiles(text: str | None) -> tuple[Profile, ...]:
    """All profiles, or the named ones plus the references (and governed, the reference of a workers profile)."""
    names = _names(text, [p.name for p in PROFILES], "target")
    if not names:
        return tuple(PROFILES)
    if any(p.workers > 1 for p in PROFILES if p.name in names):
        names.append("governed")
    return tuple(p for p in PROFILES if p.name in REFERENCES or p.name in names)


def _chosen_workloads(text: str | None) -> tuple[str, ...]:
    names = _names(text, list(WORKLOADS), "workload")
    return tuple(w for w in WORKLOADS if w in names) if names else WORKLOADS


class Bench:
    """One benchmark run: processes, tenant, rounds and results."""

    def __init__(self, plan: Plan, work_dir: Path, store_url: str | None = None) -> None:
        self.plan = plan
        self.work_dir = work_dir
        # The governed profiles' Redis: `store_url` if given, else the bench's own (see start).
        self.store_url = store_url or REDIS_URL
        self.own_store = store_url is None
        self.store: Proc | None = None
        self.pin = can_pin()
        self.target_core = TARGET_CORE if self.pin else None
        self.load_core = LOAD_CORE if self.pin else None
        self.wrk_path: str | None = None
        self.mock: Proc | None = None
        self.targets: list[Target] = []
        self.status: dict[str, str] = {}
        self.tenant: Tenant | None = None
        self.rounds: dict[str, dict[str, list[report.Round]]] = {}
        self.notes: list[str] = []

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.notes.append(line)

    # -- set-up -------------------------------------------------------------
    async def start(self) -> None:
        if self.pin:
            os.sched_setaffinity(0, {LOAD_CORE})  # the harness is the asyncio load client
            self.say(f"pinning: targets on core {TARGET_CORE}; provider, wrk and asyncio clients on core {LOAD_CORE}; --workers targets unpinned")
        else:
            self.say("pinning: UNAVAILABLE (needs taskset and 2 cores); figures are not comparable to pinned runs")
        self.wrk_path, line = wrk.ensure_wrk()
        self.say(line)
        self.mock, upstream = start_mock(self.work_dir, JSON_TOKENS, self.load_core)
        await wait_http(upstream + "/v1/models", self.mock)
        self.targets.append(Target(self.plan.profiles[0], self.mock, upstream))
        self.status["direct"] = "ok"

        governed = [p for p in self.plan.profiles if p.governed and not p.missing_units()]
        if governed:
            await self._start_store()
            try:
                self.tenant = Tenant(self.store_url)
                await self.tenant.create()
            except Exception as exc:  # noqa: BLE001 - any store failure only skips the governed profiles
                self.tenant = None
                for p in governed:
                    self.status[p.name] = f"skipped: store {self.store_url} unusable ({type(exc).__name__}: {exc})"
        started: list[tuple[Target, str]] = []
        for profile in self.plan.profiles[1:]:
            if missing := profile.missing_units():
                self.status[profile.name] = f"skipped: unit {', '.join(missing)} not available"
                continue
            if profile.name in self.status:
                continue
            prefix = self.tenant.prefix if self.tenant else "sovbench-unused"
            proc, base = start_target(profile, upstream, self.work_dir, self.target_core, self.store_url, prefix)
            headers = {"Authorization": f"Bearer {self.tenant.key}"} if profile.governed and self.tenant else {}
            started.append((Target(profile, proc, base, headers), "/healthz"))
        for target, probe in started:
            try:
                await wait_http(target.base + probe, target.proc)
                if target.profile.workers > 1:
                    await wait_workers(target.base + probe, target.proc, target.profile.workers)
            except RuntimeError as exc:
                self.status[target.name] = f"FAILED to start: {exc}"
                target.proc.stop()
                continue
            if "agent" in (target.profile.pipeline or []) and not await _tool_servers_ready(target.base):
                self.status[target.name] = "FAILED to start: its tool server did not connect"
                target.proc.stop()
                continue
            self.status[target.name] = "ok"
            self.targets.append(target)
        for profile in self.plan.profiles:
            self.say(f"  {profile.name:15} {self.status.get(profile.name, '?')}")

    async def _start_store(self) -> None:
        """The bench's own redis-server on the load's core, unless --store-url named one (or none is installed)."""
        if self.own_store:
            try:
                started = await start_store(self.work_dir, self.load_core)
            except RuntimeError as exc:
                self.say(f"store: own redis-server FAILED to start ({exc}); using the shared Redis at {self.store_url}")
                return
            if started is None:
                self.say(f"store: redis-server not installed; using the shared Redis at {self.store_url} (its CPU may land on the target's core)")
                return
            self.store, self.store_url = started
            self.say(f"store: own redis-server at {self.store_url}, on core {LOAD_CORE if self.pin else '(unpinned)'} with the load")
        else:
            self.say(f"store: {self.store_url} (--store-url; its CPU is not pinned by the bench)")

    async def stop(self) -> None:
        for target in self.targets[1:]:
            target.proc.stop()
        if self.mock is not None:
            self.mock.stop()
        if self.tenant is not None:
            with contextlib.suppress(Exception):
                await self.tenant.cleanup()
        if self.store is not None:
            self.store.stop()

    # -- workloads ----------------------------------------------------------
    async def measured(self, target: Target, work: Callable[[], Awaitable[report.Round]], charge: bool) -> report.Round:
        """Run one workload on an idle target; add the provider's CPU% and the credit check."""
        assert self.mock is not None
        await target.proc.quiesce()
        before = await self.tenant.balance() if charge else 0
        mock_cpu, wall = self.mock.cpu_seconds(), time.perf_counter()
        try:
            result = await work()
        except Exception as exc:  # noqa: BLE001 - a broken workload is reported, not raised
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        busy = (self.mock.cpu_seconds() - mock_cpu) / (time.perf_counter() - wall) * 100
        if not target.proc.alive():
            result = {"failed": f"{target.name} exited:\n{target.proc.log_tail()}"}
        if "failed" in result:
            return result
        result["provider_cpu_pct"] = busy
        if charge:
            await target.proc.quiesce()  # settlement may finish after the response
            charged = before - await self.tenant.balance()
            if charged <= 0:
                return {"failed": "credits were not charged (balance did not go down)"}
            result["credits_charged"] = charged
        return result

    def body(self, target: Target, stream: bool, max_tokens: int) -> bytes:
        return request_body(target.profile.path, stream, max_tokens, target.profile.model)

    async def latency_1c(self, target: Target) -> report.Round:
        stats = await streams.sequential(target.url, self.body(target, False, JSON_TOKENS), target.headers, self.plan.duration)
        if stats.failures:
            return {"failed": f"{stats.failures} requests failed, first: {stats.first_failure}"}
        ms = [x * 1000 for x in stats.latencies]
        return {"p50_ms": report.percentile(ms, 50), "p99_ms": report.percentile(ms, 99), "requests": len(ms)}

    async def throughput_64c(self, target: Target) -> report.Round:
        body = self.body(target, False, JSON_TOKENS)
        cpu = target.proc.cpu_seconds()
        store_cpu = self.store.cpu_seconds() if self.store is not None else 0.0
        if self.wrk_path:
            script = self.work_dir / f"{target.name}.lua"
            script.write_text(wrk.lua_script(body, target.headers))
            rep = await wrk.run(self.wrk_path, target.url, script, 64, self.plan.duration, self.load_core)
            if rep.non_2xx or rep.socket_errors:
                return {"failed": f"wrk: {rep.non_2xx} non-2xx responses, {rep.socket_errors} socket errors"}
            requests, rps, p99 = rep.requests, rep.rps, rep.p99_ms
        else:
            start = time.perf_counter()
            stats = await streams.concurrent_load(target.url, body, target.headers, 64, self.plan.duration)
            if stats.failures:
                return {"failed": f"{stats.failures} requests failed, first: {stats.first_failure}"}
            requests = len(stats.latencies)
            rps = requests / (time.perf_counter() - start)
            p99 = report.percentile([x * 1000 for x in stats.latencies], 99)
        cpu_us = (target.proc.cpu_seconds() - cpu) / max(1, requests) * 1e6
        result = {"rps": rps, "p99_ms": p99, "cpu_us_per_req": cpu_us, "requests": requests}
        if self.store is not None:
            # The bench's own Redis serves only the governed targets: its CPU per request is theirs.
            result["store_cpu_us_per_req"] = (self.store.cpu_seconds() - store_cpu) / max(1, requests) * 1e6
        return result

    async def streams_100x50(self, target: Target) -> report.Round:
        headers = {**target.headers, "x-mock-chunks": str(STREAM_CHUNKS), "x-mock-delay-ms": str(STREAM_DELAY_MS)}
        kind = target.profile.sse
        results = await streams.paced_streams(target.url, self.body(target, True, STREAM_CHUNKS * 2), headers, STREAM_COUNT, kind)
        bad = [r for r in results if r.status != 200 or r.error or not r.complete]
        expected = kind.expected(STREAM_CHUNKS)
        lost = sum(max(0, expected - r.chunks) for r in results)
        if bad or lost or any(r.chunks != expected for r in results):
            first = bad[0].error if bad else f"{lost} chunks lost"
            return {"failed": f"{len(bad)}/{len(results)} streams incomplete or failed, {lost} chunks lost; {first}"}
        gaps = [g * 1000 for r in results for g in r.gaps]
        ttfc = [r.first_chunk * 1000 for r in results if r.first_chunk is not None]
        done = [r.done * 1000 for r in results if r.done is not None]
        return {
            "ttfc_p50_ms": report.percentile(ttfc, 50),
            "gap_mean_ms": sum(gaps) / len(gaps),
            "gap_p99_ms": report.percentile(gaps, 99),
            "completion_p50_ms": report.percentile(done, 50),
            "completion_p99_ms": report.percentile(done, 99),
            "chunks_lost": 0,
        }

    async def open_streams_1000(self, target: Target) -> report.Round:
        # The provider pauses 60 s after the first chunk: every stream stays open until closed.
        headers = {**target.headers, "x-mock-chunks": "1", "x-mock-delay-ms": "60000"}

        async def sample() -> float:
            return target.proc.rss_mb()

        at_sample, rss, results = await streams.open_streams(
            target.url, self.body(target, True, 16), headers, OPEN_STREAMS, target.profile.sse, sample, open_timeout=30
        )
        if at_sample != OPEN_STREAMS:
            first = next((r.error for r in results if r.error), "")
            return {"failed": f"only {at_sample}/{OPEN_STREAMS} streams open at the sample; {first}"}
        return {"rss_mb": float(rss)}  # type: ignore[arg-type]

    # -- rounds -------------------------------------------------------------
    CHARGED = {"latency_1c", "throughput_64c", "streams_100x50"}  # open streams are cut before any output

    async def run_rounds(self) -> None:
        started = time.monotonic()
        for n in range(self.plan.rounds):
            if n and time.monotonic() - started > self.plan.budget:
                self.say(f"time budget reached: stopping after {n} rounds")
                break
            order = self.targets[n % len(self.targets):] + self.targets[: n % len(self.targets)]
            for workload in self.plan.workloads:
                for target in order:
                    if target.profile.workloads is not None and workload not in target.profile.workloads:
                        continue
                    work = getattr(self, workload)
                    charge = target.profile.governed and workload in self.CHARGED and self.tenant is not None
                    began = time.monotonic()
                    result = await self.measured(target, functools.partial(work, target), charge)
                    self.rounds.setdefault(workload, {}).setdefault(target.name, []).append(result)
                    state = "FAILED: " + result["failed"].splitlines()[0] if "failed" in result else "ok"
                    print(f"round {n + 1} {workload:18} {target.name:15} {time.monotonic() - began:5.1f}s {state}", flush=True)
            self.add_relative(n)

    def add_relative(self, n: int) -> None:
        """Figures that compare round n of each target with round n of direct."""
        for workload, fields in (("latency_1c", (("p50_ms", "added_p50_ms"), ("p99_ms", "added_p99_ms"))), ("streams_100x50", (("gap_mean_ms", "added_gap_ms"),))):
            per_target = self.rounds.get(workload, {})
            direct = per_target.get("direct", [])
            base = direct[n] if len(direct) > n and "failed" not in direct[n] else None
            for rounds in per_target.values():
                if len(rounds) > n and "failed" not in rounds[n] and base is not None:
                    for source, added in fields:
                        rounds[n][added] = rounds[n][source] - base[source]

    # -- report -------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {w: {t: report.aggregate(r) for t, r in per.items()} for w, per in self.rounds.items()}

    def tables(self, summary: dict[str, dict[str, dict[str, Any]]]) -> str:
        columns = {
            "latency_1c": [("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("added p50 ms", "added_p50_ms"), ("added p99 ms", "added_p99_ms")],
            "throughput_64c": [("req/s", "rps"), ("p99 ms", "p99_ms"), ("CPU µs/req", "cpu_us_per_req"), ("store CPU µs/req", "store_cpu_us_per_req"), ("provider CPU%", "provider_cpu_pct")],
            "streams_100x50": [("TTFC p50 ms", "ttfc_p50_ms"), ("added gap ms", "added_gap_ms"), ("done p50 ms", "completion_p50_ms"), ("done p99 ms", "completion_p99_ms"), ("lost", "chunks_lost")],
            "open_streams_1000": [("RSS MB", "rss_mb")],
        }
        ratio_metric = {"latency_1c": "p50_ms", "throughput_64c": "rps", "streams_100x50": "completion_p50_ms", "open_streams_1000": "rss_mb"}
        out = []
        for workload, cols in columns.items():
            cells = summary.get(workload)
            if not cells:
                continue
            metric = ratio_metric[workload]
            header = ["target", *(c[0] for c in cols), f"{metric} vs floor", f"{metric} vs direct"]
            rows = []
            for name, cell in cells.items():
                row = [name, *(report.fmt(cell, m) for _, m in cols)]
                row += [report.fmt_ratio(report.ratio(cell, cells.get("floor"), metric)), report.fmt_ratio(report.ratio(cell, cells.get("direct"), metric))]
                rows.append(row)
            out.append(f"== {workload} (median [min–max] of rounds)\n{report.render_table(header, rows)}")
            failures = [f"  {name}: FAILED: {cell['failed']}" for name, cell in cells.items() if "failed" in cell]
            out.extend(failures)
        busy = summary.get("throughput_64c", {})
        hot = [n for n, c in busy.items() if "provider_cpu_pct" in c and c["provider_cpu_pct"]["max"] > BUSY_PROVIDER_PCT]
        if hot:
            out.append(f"WARNING: provider CPU above {BUSY_PROVIDER_PCT:.0f}% during throughput of {', '.join(hot)}: it may be the bottleneck")
        lines = report.target_lines(summary)
        targets = "== issue targets (same-run ratios)\n" + report.render_table(["target", "ratio", "verdict"], lines)
        notes = [report.workers_note(summary, p.name, p.workers) for p in self.plan.profiles if p.workers > 1]
        out.append("\n".join([targets, *(n for n in notes if n is not None)]))
        return "\n\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="sovbench-") as tmp:
        bench = Bench(plan, Path(tmp), args.store_url)
        try:
            await bench.start()
            await bench.run_rounds()
        finally:
            await bench.stop()
        summary = bench.summary()
        text = bench.tables(summary)
    print("\n" + text)
    data = {
        "started_at": began,
        "seconds": time.time() - began,
        "plan": {
            "rounds": plan.rounds,
            "duration": plan.duration,
            "quick": args.quick,
            "targets": [p.name for p in plan.profiles],
            "workloads": list(plan.workloads),
        },
        "host": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(), "pinned": bench.pin},
        "load_generator": "wrk" if bench.wrk_path else "asyncio",
        "store": "own redis-server" if bench.store is not None else bench.store_url,
        "targets": bench.status,
        "notes": bench.notes,
        "rounds": bench.rounds,
        "summary": summary,
        "issue_targets": [dict(zip(("target", "figure", "verdict"), t)) for t in report.target_lines(summary)],
    }
    out.write_text(json.dumps(data, indent=2))
    print(f"\nwrote {out} ({data['seconds']:.0f} s)")
    failed = any("failed" in cell for cells in summary.values() for cell in cells.values())
    return 1 if failed else 0

async def _tool_servers_ready(base: str, timeout: float = 60.0) -> bool:
    """Wait until /readyz lists no unreachable tool server (agent mode connects in the background)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(base + "/readyz") as response:
                body = await response.json()
            if response.status == 200 and not body.get("reasons"):
                return True
            await asyncio.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run, < 60 s)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds per target of each timed workload (default 6, quick 1)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "latest.json"), help="JSON results file")
    parser.add_argument("--targets", help="comma-separated targets to run (direct and floor always run)")
    parser.add_argument(
        "--store-url",
        help="Redis of the governed profiles (default: the bench starts its own redis-server on the load's core; "
        "SOVEREIGN_TEST_REDIS_URL when redis-server is not installed)",
    )
    parser.add_argument("--workloads", help=f"comma-separated workloads to run (default all: {','.join(WORKLOADS)})")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(main_async(args))
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())

