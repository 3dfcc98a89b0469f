"""OpenTelemetry: spans per request, provider call and store script; traceparent in and out; off means not loaded.

Spans are checked in the SDK's in-memory exporter (added beside the OTLP one)
and, once, as protobuf at a real OTLP/HTTP receiver on a loopback socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,  # noqa: E402
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from proxy.core.telemetry import traces_url  # noqa: E402
from proxy.store.accounts import Accounts  # noqa: E402
from tests.support import REDIS_URL, REPO, make_settings, until  # noqa: E402

CHAT = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
async def receiver():
    """An OTLP/HTTP traces receiver: collects each export's decoded protobuf."""
    exports: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        exports.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", exports
    await runner.cleanup()


async def traced_gateway(gateway_factory, mock, redis_prefix, endpoint, tenant_labels=False):
    settings = make_settings(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "rate_limit", "metering"], admin_token=None,
        telemetry={"otlp_endpoint": endpoint, "service_name": "sovereign-test"},
        metrics={"tenant_labels": tenant_labels}, logging={"level": "info", "access_log": True},
    )
    running = await gateway_factory(settings)
    exporter = InMemorySpanExporter()
    running.gateway.tracing.add_exporter(exporter)
    accounts = Accounts(running.gateway.store)
    tenant = "t-" + uuid.uuid4().hex[:10]
    await accounts.create_tenant(tenant, 10_000_000)
    key, _ = await accounts.create_key(tenant, rpm=100)
    return running, exporter, tenant, key


async def chat(running, key: str, headers: dict | None = None, body: dict = CHAT) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        async with session.post(running.v1 + "/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}", **(headers or {})}) as resp:
            await resp.read()
            return resp


def spans_by_name(exporter: InMemorySpanExporter) -> dict:
    return {span.name: span for span in exporter.get_finished_spans()}


async def test_a_request_continues_the_callers_trace_down_to_the_provider(receiver, mock, gateway_factory, redis_prefix):
    endpoint, _ = receiver
    running, exporter, tenant, key = await traced_gateway(gateway_factory, mock, redis_prefix, endpoint)
    with capture_logs() as logs:
        resp = await chat(running, key, {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        assert resp.status == 200
        await until(lambda: any(entry.get("event") == "request" for entry in logs))
    await until(lambda: "POST /v1/chat/completions" in spans_by_name(exporter))
    spans = spans_by_name(exporter)
    server, provider_span = spans["POST /v1/chat/completions"], spans["chat default"]
    assert format(server.context.trace_id, "032x") == CALLER_TRACE
    assert format(server.parent.span_id, "016x") == CALLER_SPAN and server.parent.is_remote
    assert provider_span.parent.span_id == server.context.span_id

    attributes = server.attributes
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.request.model"] == "sovereign-alpha"
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["sovereign.credits"] > 0
    assert attributes["sovereign.upstream"] == "default"
    assert "sovereign.tenant" not in attributes  # behind metrics.tenant_labels, like the metric label

    # The provider got the provider span as its parent, in the caller's trace (not the caller's own span).
    traceparent = mock.requests[-1]["headers"]["traceparent"]
    assert traceparent == f"00-{CALLER_TRACE}-{format(provider_span.context.span_id, '016x')}-01"

    # The request's store scripts are spans of the same trace, the settlement (after the reply) too.
    await until(lambda: "store hold_settle" in spans_by_name(exporter))
    request_scripts = ("store ratelimit", "store hold_reserve", "store hold_settle")
    scripts = [s for s in exporter.get_finished_spans() if s.name in request_scripts]
    assert {s.name for s in scripts} == set(request_scripts)
    assert all(format(s.context.trace_id, "032x") == CALLER_TRACE for s in scripts)
    assert all(s.attributes["db.system"] == "redis" for s in scripts)

    # The access log line carries the trace id.
    line = next(entry for entry in logs if entry.get("event") == "request")
    assert line["trace_id"] == CALLER_TRACE


async def test_without_traceparent_a_new_trace_starts_and_tenant_is_an_attribute_when_enabled(receiver, mock, gateway_factory, redis_prefix):
    endpoint, _ = receiver
    running, exporter, tenant, key = await traced_gateway(gateway_factory, mock, redis_prefix, endpoint, tenant_labels=True)
    assert (await chat(running, key)).status == 200
    await until(lambda: "POST /v1/chat/completions" in spans_by_name(exporter))
    server = spans_by_name(exporter)["POST /v1/chat/completions"]
    assert server.parent is None
    trace_id = format(server.context.trace_id, "032x")
    assert trace_id != CALLER_TRACE and int(trace_id, 16) != 0
    assert server.attributes["sovereign.tenant"] == tenant
    assert mock.requests[-1]["headers"]["traceparent"].split("-")[1] == trace_id


async def test_failed_requests_are_spans_too(receiver, mock, gateway_factory, redis_prefix):
    endpoint, _ = receiver
    running, exporter, _, key = await traced_gateway(gateway_factory, mock, redis_prefix, endpoint)
    resp = await chat(running, key, {"x-mock-fail-status": "500"})
    assert resp.status == 502
    await until(lambda: "POST /v1/chat/completions" in spans_by_name(exporter))
    spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert server.attributes["http.response.status_code"] == 502
    attempts = [s for s in spans if s.name == "chat default"]
    assert attempts and all(not s.status.is_ok for s in attempts)  # each failed attempt is an error span


async def test_spans_reach_a_real_otlp_receiver(receiver, mock, gateway_factory, redis_prefix):
    endpoint, exports = receiver
    running, exporter, _, key = await traced_gateway(gateway_factory, mock, redis_prefix, endpoint)  # bare address: /v1/traces added
    assert (await chat(running, key, {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})).status == 200
    await until(lambda: "POST /v1/chat/completions" in spans_by_name(exporter))
    await asyncio.to_thread(running.gateway.tracing.provider.force_flush)  # off the loop the receiver runs on
    await until(lambda: bool(exports), timeout=10)
    received = [span for export in exports for rs in export.resource_spans for ss in rs.scope_spans for span in ss.spans]
    names = {span.name for span in received}
    assert {"POST /v1/chat/completions", "chat default"} <= names
    assert all(span.trace_id.hex() == CALLER_TRACE for span in received if span.name in ("POST /v1/chat/completions", "chat default"))
    resource = {a.key: a.value.string_value for a in exports[0].resource_spans[0].resource.attributes}
    assert resource["service.name"] == "sovereign-test"


def test_traces_url_adds_the_standard_path_to_a_bare_address():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://otel.example/custom/traces") == "https://otel.example/custom/traces"


SERVE_AND_LIST_MODULES = r"""
import asyncio, json, sys

class NotInstalled:
    # With "block": OpenTelemetry is as good as not installed (the `otel` extra is optional).
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(f"No module named {name!r}")
        return None

if sys.argv[2] == "block":
    sys.meta_path.insert(0, NotInstalled())

import aiohttp
from aiohttp import web
from proxy.devtools.mock_upstream import MockUpstream
from proxy.web.app import create_app
from proxy.web.middlewares import AccessLogger
from proxy.core.settings import Settings

async def main():
    mock = MockUpstream()
    url = await mock.start()
    settings = Settings.model_validate({
        "upstreams": {"default": {"url": url}}, "pipeline": [], "logging": {"level": "warning"},
        "models": {"sovereign-alpha": {"free": True}}, "telemetry": {"otlp_endpoint": sys.argv[1] or None},
    })
    runner = web.AppRunner(create_app(settings), access_log_class=AccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                json={"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            status = resp.status
            await resp.read()
    await runner.cleanup()
    await mock.close()
    print(json.dumps({"status": status, "modules": sorted(m for m in sys.modules if m.startswith(("opentelemetry", "proxy.core.telemetry", "proxy.web.tracing")))}))

asyncio.run(main())
"""

# Tracing's own modules: redis-py 8 imports the OpenTelemetry *metrics* API by itself whenever it is
# installed (its own observability, off unless initialised), so "opentelemetry" alone proves nothing.
TRACING_MODULES = ("proxy.core.telemetry", "proxy.web.tracing", "opentelemetry.sdk.trace", "opentelemetry.exporter")


def serve_once(*runs: tuple[str, bool]) -> list[dict]:
    """Each (endpoint, block) in its own fresh interpreter, all at once; their status and loaded modules."""
    env = {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1"}  # "on" exports to a closed port at exit: fail fast
    procs = [
        subprocess.Popen([sys.executable, "-c", SERVE_AND_LIST_MODULES, endpoint, "block" if block else "-"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for endpoint, block in runs
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_with_telemetry_off_no_tracing_module_is_imported_and_opentelemetry_is_optional():
    off, on, blocked = serve_once(("", False), ("http://127.0.0.1:9/v1/traces", False), ("", True))
    assert off["status"] == 200
    assert [m for m in off["modules"] if m.startswith(TRACING_MODULES)] == []
    # The same check sees them when tracing is on.
    assert on["status"] == 200
    assert {"proxy.core.telemetry", "opentelemetry.sdk.trace"} <= set(on["modules"])
    # Off, the gateway serves with OpenTelemetry not importable at all (the extra not installed).
    assert blocked["status"] == 200 and blocked["modules"] == []


def test_a_bad_endpoint_is_a_config_error_naming_the_field():
    from proxy.core.settings import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"telemetry\.otlp_endpoint: must be an http"):
        load_settings(env={}, overrides={"telemetry": {"otlp_endpoint": "grpc://collector:4317"}})
