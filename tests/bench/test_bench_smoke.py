"""The benchmark harness's pieces work: the floor relays byte-for-byte, clients count right, helpers compute right.

No timing assertions: these only prove that what bench/run.py measures is measured correctly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bench import floor, report, streams, wrk
from bench.profiles import CHAT_PATH, RESPONSES_PATH, Proc, Profile, request_body
from bench.streams import CHAT_SSE, RESPONSES_SSE

_VOLATILE = re.compile(rb'"id":"chatcmpl-mock-\d+"|"created":\d+')


def _stable(data: bytes) -> bytes:
    """The reply without the two fields the provider changes per request."""
    return _VOLATILE.sub(b"", data)


@pytest.fixture
async def floor_url(mock):
    server = TestServer(floor.make_app(mock.url), host="127.0.0.1", port=0)
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as client:
        async with client.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as resp:
            return resp.status, resp.content_type, await resp.read()


@pytest.mark.parametrize("stream", [False, True])
async def test_floor_relays_json_and_sse_byte_for_byte(mock, floor_url, stream):
    body = request_body(CHAT_PATH, stream, 64)
    headers = {"x-mock-chunks": "5"}
    direct = await _post(mock.url + "/chat/completions", body, headers)
    relayed = await _post(floor_url + CHAT_PATH, body, headers)
    assert direct[0] == relayed[0] == 200
    assert relayed[1] == ("text/event-stream" if stream else "application/json")
    assert _stable(relayed[2]) == _stable(direct[2])
    # The provider got the body as sent and the x-mock header passed through.
    assert mock.requests[-1]["body"] == mock.requests[-2]["body"]
    assert mock.requests[-1]["headers"]["x-mock-chunks"] == "5"


async def test_floor_relays_provider_errors(mock, floor_url):
    status, _, data = await _post(floor_url + CHAT_PATH, b'{"model": "m"}', {})
    assert status == 400 and b"messages" in data


async def test_paced_streams_count_every_chunk(mock, floor_url):
    headers = {"x-mock-chunks": "6", "x-mock-delay-ms": "2"}
    results = await streams.paced_streams(floor_url + CHAT_PATH, request_body(CHAT_PATH, True, 64), headers, 20, CHAT_SSE)
    assert len(results) == 20
    for r in results:
        assert (r.status, r.error, r.complete, r.chunks) == (200, "", True, CHAT_SSE.expected(6))
        assert len(r.gaps) == r.chunks - 1 and 0 < r.first_chunk <= r.done


async def test_open_streams_samples_while_all_are_open(mock):
    seen: list[int] = []

    async def sample() -> str:
        seen.append(mock.stats["streams_started"] - mock.stats["client_disconnects"])
        return "sampled"

    headers = {"x-mock-chunks": "1", "x-mock-delay-ms": "60000"}
    at_sample, sampled, results = await streams.open_streams(
        mock.url + "/chat/completions", request_body(CHAT_PATH, True, 16), headers, 30, CHAT_SSE, sample, open_timeout=10
    )
    assert (at_sample, sampled, seen) == (30, "sampled", [30])
    assert all(r.status == 200 and not r.error for r in results)


async def test_open_streams_counts_failures_without_waiting(mock):
    async def sample() -> None:
        return None

    headers = {"x-mock-fail-status": "500"}
    at_sample, _, results = await streams.open_streams(
        mock.url + "/chat/completions", request_body(CHAT_PATH, True, 16), headers, 5, CHAT_SSE, sample, open_timeout=30
    )
    assert at_sample == 0 and all(r.status == 500 and r.error.startswith("HTTP 500") for r in results)


async def test_sequential_client_reports_failures(mock):
    ok = await streams.sequential(mock.url + "/chat/completions", request_body(CHAT_PATH, False, 4), {}, 0.2, warmup=2)
    assert ok.failures == 0 and ok.latencies and all(x > 0 for x in ok.latencies)
    bad = await streams.sequential(mock.url + "/chat/completions", b"{}", {}, 0.1, warmup=0)
    assert bad.failures > 0 and not bad.latencies and bad.first_failure.startswith("HTTP 400")


def test_responses_sse_counts_only_nonempty_text_deltas():
    assert RESPONSES_SSE.is_chunk(b'event: response.output_text.delta\ndata: {"delta":"hi "}')
    assert not RESPONSES_SSE.is_chunk(b'event: response.output_text.delta\ndata: {"delta":""}')
    assert not RESPONSES_SSE.is_chunk(b"event: response.created\ndata: {}")
    assert CHAT_SSE.is_chunk(b"data: {}") and not CHAT_SSE.is_chunk(b"data: [DONE]")
    assert CHAT_SSE.expected(50) == 52 and RESPONSES_SSE.expected(50) == 50


def test_request_bodies_per_endpoint():
    assert b'"input"' in request_body(RESPONSES_PATH, True, 8) and b'"stream":true' in request_body(RESPONSES_PATH, True, 8)
    assert b'"messages"' in request_body(CHAT_PATH, False, 8) and b"stream" not in request_body(CHAT_PATH, False, 8)


def test_percentile_interpolates():
    values = list(range(1, 101))
    assert report.percentile(values, 50) == pytest.approx(50.5)
    assert report.percentile(values, 99) == pytest.approx(99.01)
    assert report.percentile(values, 0) == 1 and report.percentile(values, 100) == 100
    assert report.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        report.percentile([], 50)


def test_aggregate_and_ratios():
    cell = report.aggregate([{"rps": 100.0}, {"rps": 300.0}, {"rps": 200.0}])
    assert cell == {"rps": {"median": 200.0, "min": 100.0, "max": 300.0}}
    floor_cell = report.aggregate([{"rps": 400.0}])
    assert report.ratio(cell, floor_cell, "rps") == 0.5
    assert report.fmt_ratio(0.5) == "50%" and report.fmt(cell, "rps", 0) == "200 [100–300]"
    failed = report.aggregate([{"rps": 1.0}, {"failed": "2 chunks lost"}])
    assert failed == {"failed": "2 chunks lost"}
    assert report.fmt(failed, "rps") == "FAILED" and report.ratio(failed, floor_cell, "rps") is None


def test_issue_targets_are_same_run_ratios():
    def cells(**metrics: float) -> dict:
        return report.aggregate([metrics])

    summary = {
        "throughput_64c": {"floor": cells(rps=1000.0), "passthrough": cells(rps=1250.0), "governed": cells(rps=1050.0),
                           "responses": cells(rps=900.0), "messages": cells(rps=850.0), "embeddings": cells(rps=900.0)},
        "latency_1c": {"floor": cells(added_p50_ms=0.50, added_p99_ms=1.00), "governed": cells(added_p50_ms=0.55, added_p99_ms=1.10)},
        "streams_100x50": {"floor": cells(completion_p50_ms=1000.0, chunks_lost=0), "governed": {"failed": "3 chunks lost"}},
        "open_streams_1000": {"floor": cells(rss_mb=80.0)},
    }
    lines = {d: (fig, v) for d, fig, v in report.target_lines(summary)}
    assert lines == {
        "governed / passthrough throughput (64 conn) >= 0.80": ("0.840", "PASS"),
        "governed / floor throughput (64 conn) >= 1.00": ("1.050", "PASS"),
        "responses / passthrough throughput (64 conn) >= 0.75": ("0.720", "MISS"),
        "governed / floor added latency p50 (1 conn) <= 1.00": ("1.100", "MISS"),
        "governed / floor added latency p99 (1 conn) <= 1.20": ("1.100", "PASS"),
        "governed / floor stream completion (100x50) <= 1.05, 0 lost": ("FAILED", "FAILED"),
        "governed / floor RSS (1,000 open streams) <= 1.20": ("-", "n/a"),
        "messages / responses throughput (64 conn) >= 0.90": ("0.944", "PASS"),
        "embeddings / governed throughput (64 conn) >= 0.90": ("0.857", "MISS"),
    }
    # No absolute-time verdicts: every target names the reference it is divided by.
    assert all(t.relative_to for t in report.ISSUE_TARGETS) and len(report.ISSUE_TARGETS) == 9


def test_ratio_targets_edge_cases():
    target = next(t for t in report.ISSUE_TARGETS if t.zero == "chunks_lost")
    good = {"streams_100x50": {"floor": report.aggregate([{"completion_p50_ms": 1000.0, "chunks_lost": 0}]),
                               "governed": report.aggregate([{"completion_p50_ms": 1030.0, "chunks_lost": 0}])}}
    assert target.evaluate(good) == ("1.030, 0 chunks lost", "PASS")
    lost = {"streams_100x50": {**good["streams_100x50"], "governed": report.aggregate([{"completion_p50_ms": 1000.0, "chunks_lost": 2}])}}
    assert target.evaluate(lost) == ("1.000, 2 chunks lost", "MISS")
    p50 = next(t for t in report.ISSUE_TARGETS if t.metric == "added_p50_ms")
    # A floor whose added latency the noise cancelled gives no ratio, not a PASS.
    noisy = {"latency_1c": {"floor": report.aggregate([{"added_p50_ms": -0.01}]), "governed": report.aggregate([{"added_p50_ms": 0.4}])}}
    assert p50.evaluate(noisy) == ("-", "n/a")
    close = {"latency_1c": {"floor": report.aggregate([{"added_p50_ms": 0.5}]), "governed": report.aggregate([{"added_p50_ms": 0.502}])}}
    assert p50.evaluate(close) == ("1.004", "MISS")  # three places: never a "1.00" that missed
    assert p50.evaluate({"latency_1c": {"floor": {"failed": "boom"}, "governed": report.aggregate([{"added_p50_ms": 0.4}])}}) == ("FAILED", "FAILED")


def test_workers_note_reads_scaling_against_one_governed_core():
    summary = {"throughput_64c": {"governed": report.aggregate([{"rps": 2000.0}]), "governed_2w": report.aggregate([{"rps": 3100.0}])}}
    note = report.workers_note(summary, "governed_2w", 2)
    assert note is not None and note.startswith("note: governed_2w (2 workers, all cores) serves 3100 req/s, 1.55x governed on one core")
    assert "indicative" in note
    assert report.workers_note({"throughput_64c": {"governed": summary["throughput_64c"]["governed"]}}, "governed_2w", 2) is None
    failed = report.workers_note({"throughput_64c": {**summary["throughput_64c"], "governed_2w": {"failed": "wrk: 3 non-2xx\nmore"}}}, "governed_2w", 2)
    assert failed == "note: governed_2w (2 workers) FAILED: wrk: 3 non-2xx"


def test_render_table_aligns_columns():
    text = report.render_table(["target", "req/s"], [["floor", "10"], ["governed", "1234"]])
    assert text.splitlines() == ["target    req/s", "--------  -----", "floor        10", "governed   1234"]


WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:9911/v1/chat/completions
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.79ms    4.05ms  25.21ms   84.54%
    Req/Sec     4.11k     5.01k   14.44k    80.00%
  Latency Distribution
     50%  430.00us
     75%    4.11ms
     90%    8.90ms
     99%    1.20s
  4132 requests in 1.04s, 2.25MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 17
Requests/sec:   3989.84
Transfer/sec:      2.18MB
"""


def test_wrk_report_parsing_and_script():
    rep = wrk.parse(WRK_OUTPUT)
    assert (rep.requests, rep.rps, rep.non_2xx, rep.socket_errors) == (4132, 3989.84, 17, 3)
    assert rep.p50_ms == pytest.approx(0.43) and rep.p99_ms == pytest.approx(1200.0) and rep.seconds == pytest.approx(1.04)
    clean = wrk.parse(WRK_OUTPUT.replace("  Socket errors: connect 0, read 2, write 0, timeout 1\n", "").replace("  Non-2xx or 3xx responses: 17\n", ""))
    assert (clean.non_2xx, clean.socket_errors) == (0, 0)
    with pytest.raises(ValueError):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused")
    script = wrk.lua_script(b'{"a": 1}', {"Authorization": "Bearer k"})
    assert 'wrk.body = [==[{"a": 1}]==]' in script and 'wrk.headers["Authorization"] = "Bearer k"' in script


def test_profiles_report_missing_units():
    assert Profile("x", "", pipeline=["auth"]).governed
    assert not Profile("y", "", pipeline=[]).governed and Profile("y", "", pipeline=[]).missing_units() == []


async def test_proc_reads_cpu_and_rss(tmp_path):
    proc = Proc("sleeper", ["-c", "import time; sum(range(10**6)); time.sleep(30)"], None, tmp_path)
    try:
        await proc.quiesce(limit=5)
        assert proc.alive() and proc.rss_mb() > 1 and proc.cpu_seconds() >= 0
    finally:
        proc.stop()
    assert not proc.alive()


async def test_proc_sums_cpu_and_rss_over_its_children(tmp_path):
    """A --workers target is a supervisor and its workers: the harness reads them all."""
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'sum(range(3 * 10**7)); import time; time.sleep(30)']); "
        "time.sleep(30)"
    )
    proc = Proc("parent", ["-c", script], None, tmp_path)
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while len(proc.pids()) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        parent, child = proc.pids()
        assert parent == proc.pid
        await proc.quiesce(limit=20)  # the child's busy loop is done
        with open(f"/proc/{child}/stat") as f:
            child_cpu = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13]) / os.sysconf("SC_CLK_TCK")
        assert child_cpu > 0 and proc.cpu_seconds() >= child_cpu
        alone = Proc("alone", ["-c", "import time; time.sleep(30)"], None, tmp_path)
        try:
            await alone.quiesce(limit=5)
            assert proc.rss_mb() > alone.rss_mb() * 1.5  # two interpreters
        finally:
            alone.stop()
    finally:
        for pid in proc.pids()[1:]:
            os.kill(pid, signal.SIGKILL)
        proc.stop()


def test_every_gateway_profile_is_a_valid_configuration():
    """The configs the harness writes load as settings, unit settings included (governed_strict's switch)."""
    from bench.profiles import PROFILES, gateway_config
    from proxy.core.gateway import Gateway
    from proxy.core.settings import Settings

    for profile in (p for p in PROFILES if p.pipeline is not None):
        data = gateway_config(9999, "http://127.0.0.1:9100", profile.pipeline, "memory://", "sovbench-check", profile.units)
        units = Gateway(Settings.model_validate(data)).units
        assert [u.name for u in units] == profile.pipeline
        if profile.name == "governed_strict":
            assert units[-1].settings.speculative_hold is False


def test_target_and_workload_filters_keep_the_references():
    from bench import run

    args = argparse.Namespace(quick=True, rounds=0, duration=0.0, targets="governed", workloads="latency_1c")
    plan = run.plan_from(args)
    assert [p.name for p in plan.profiles] == ["direct", "floor", "passthrough", "governed"]
    workers = run.plan_from(argparse.Namespace(quick=True, rounds=0, duration=0.0, targets="governed_2w", workloads=None))
    assert [p.name for p in workers.profiles] == ["direct", "floor", "passthrough", "governed", "governed_2w"]
    assert plan.workloads == ("latency_1c",)
    full = run.plan_from(argparse.Namespace(quick=False, rounds=0, duration=0.0, targets=None, workloads=None))
    assert len(full.profiles) == len(run.PROFILES) and full.workloads == run.WORKLOADS
    with pytest.raises(SystemExit, match="unknown target: nope"):
        run.plan_from(argparse.Namespace(quick=True, rounds=0, duration=0.0, targets="nope", workloads=None))
