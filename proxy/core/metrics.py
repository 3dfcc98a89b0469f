"""Prometheus metrics, one registry per gateway (so tests can run several).

Names follow Prometheus conventions with the ``sovereign_`` prefix. Tenant
labels are off unless ``metrics.tenant_labels`` is set, because the number of
tenants is unbounded.

Under ``sovereign serve --workers N`` (N > 1) the supervisor gives every
worker the same private ``PROMETHEUS_MULTIPROC_DIR`` before prometheus-client
is imported: values then live in per-process files there and `render` sums
them over the workers (gauges of what is open now: over the live ones only).
With one worker the variable is unset and nothing of that runs.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, tenant_labels: bool = False) -> None:
        self.tenant_labels = tenant_labels
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, tuple[str, ...]], object] = {}
        request_labels = ["route", "model", "status"] + (["tenant"] if tenant_labels else [])
        self.requests = Counter("sovereign_requests", "Requests served, by route, model and status.", request_labels, registry=r)
        self.duration = Histogram(
            "sovereign_request_duration_seconds", "Total time to serve a request.", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_latency = Histogram(
            "sovereign_upstream_latency_seconds",
            "Time until the provider's response headers.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "sovereign_time_to_first_byte_seconds",
            "Time until the first byte of the response body reached the client's socket.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # livesum: under several workers, the sum over the workers alive now.
        self.open_streams = Gauge("sovereign_open_streams", "Streams being relayed now.", registry=r, multiprocess_mode="livesum")
        self.tokens = Counter("sovereign_tokens", "Tokens metered, by direction (input/output) and model.", ["direction", "model"], registry=r)
        self.credits = Counter("sovereign_credits_charged", "Credits charged, by model and usage source.", ["model", "source"], registry=r)
        self.holds_open = Gauge(
            "sovereign_credit_holds_open", "Credit holds this process has open now.", registry=r, multiprocess_mode="livesum"
        )
        self.credit_leases = Gauge(
            "sovereign_credit_leases", "Credit leases this process holds now (busy tenants' slices).", registry=r, multiprocess_mode="livesum"
        )
        self.leased_charges = Counter(
            "sovereign_leased_charges", "Charges of requests served from a credit lease, written in batches.", registry=r
        )
        self.settlements_pending = Gauge(
            "sovereign_settlements_pending",
            "Settlements not yet written to the store (kept in memory or in this process' spool).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.usage_clamped = Counter(
            "sovereign_usage_clamped",
            "Charges whose reported tokens exceeded what the request could use (output: its held cap; input: its bytes), charged at that bound; by direction and model.",
            ["direction", "model"],
            registry=r,
        )
        self.insufficient_credits = Counter("sovereign_insufficient_credits", "Requests refused with 402.", registry=r)
        self.rate_limited = Counter("sovereign_rate_limited", "Requests refused with 429 by the gateway's limits.", registry=r)
        self.store_errors = Counter("sovereign_store_errors", "Store operations that failed (unreachable or timed out).", registry=r)
        self.upstream_errors = Counter("sovereign_upstream_errors", "Provider failures, by upstream.", ["upstream"], registry=r)
        # Agent mode: calls of the operator's MCP tools (outcome: ok, error, timeout, unreachable, invalid_arguments, refused).
        self.tool_calls = Counter(
            "sovereign_tool_calls", "MCP tool calls run by agent models, by server, tool and outcome.", ["server", "tool", "outcome"], registry=r
        )
        self.tool_call_duration = Histogram(
            "sovereign_tool_call_duration_seconds", "Time of one MCP tool call.", ["server"], buckets=LATENCY_BUCKETS, registry=r
        )
        workers = _workers_registry()
        self.exposed = r if workers is None else workers

    def child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, cached: `labels()` takes a lock and builds a key on every call."""
        key = (metric._name, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.exposed)


def _workers_registry() -> CollectorRegistry | None:
    """A registry that reads every worker's files, when this process is one of several workers."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return None
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry
