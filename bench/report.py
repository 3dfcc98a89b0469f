"""Statistics and reporting: percentiles, round aggregation, ratio tables and the issue's targets.

A workload's result per target is a list of rounds; a round is a dict of
metric -> number, or ``{"failed": reason}``. Any failed round makes the whole
cell FAILED: a figure is only reported when every round's correctness checks held.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Round = dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the per-round figures."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def aggregate(rounds: Sequence[Round]) -> dict[str, Any]:
    """Per-metric spread over the rounds, or ``{"failed": first reason}``."""
    if not rounds:
        return {"failed": "no rounds ran"}
    for r in rounds:
        if "failed" in r:
            return {"failed": r["failed"]}
    return {metric: spread([r[metric] for r in rounds]) for metric in rounds[0]}


def fmt(cell: dict[str, Any], metric: str, digits: int = 2) -> str:
    """``median [min–max]`` of a metric, ``FAILED`` or ``-``."""
    if "failed" in cell:
        return "FAILED"
    value = cell.get(metric)
    if value is None:
        return "-"
    if value["min"] == value["max"]:
        return f"{value['median']:.{digits}f}"
    return f"{value['median']:.{digits}f} [{value['min']:.{digits}f}–{value['max']:.{digits}f}]"


def ratio(cell: dict[str, Any], reference: dict[str, Any] | None, metric: str) -> float | None:
    """Median of the cell over median of the reference, when both have the metric."""
    if reference is None or "failed" in cell or "failed" in reference:
        return None
    mine, theirs = cell.get(metric), reference.get(metric)
    if mine is None or theirs is None or theirs["median"] == 0:
        return None
    return mine["median"] / theirs["median"]


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: a same-run ratio ``target's median / reference's median`` against a limit.

    ``figure <= limit`` (or ``>=`` when ``at_least``). Every target is a ratio of
    two figures measured in the same run, never an absolute time: the host moves
    absolute figures between days, ratios much less. ``zero`` names a metric that
    must also be 0 (chunks lost).
    """

    description: str
    workload: str
    target: str
    metric: str
    limit: float
    relative_to: str
    at_least: bool = False
    zero: str | None = None

    def evaluate(self, summary: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, str]:
        """(figure text, verdict): verdict is PASS, MISS, FAILED or n/a."""
        cells = summary.get(self.workload, {})
        cell, reference = cells.get(self.target), cells.get(self.relative_to)
        if cell is None or reference is None:
            return "-", "n/a"
        if "failed" in cell or "failed" in reference:
            return "FAILED", "FAILED"
        theirs = reference.get(self.metric)
        # A ratio to a reference at or below zero (an added latency the noise cancelled) means nothing.
        if theirs is None or theirs["median"] <= 0:
            return "-", "n/a"
        value = ratio(cell, reference, self.metric)
        if value is None:
            return "-", "n/a"
        text = f"{value:.3f}"  # three places: a 1.004 must not read as a 1.00 that missed
        ok = value >= self.limit if self.at_least else value <= self.limit
        if self.zero is not None:
            left = cell.get(self.zero, {}).get("max", 0)
            text += f", {left:.0f} {self.zero.replace('_', ' ')}"
            ok = ok and left == 0
        return text, "PASS" if ok else "MISS"


# The issue's targets (issue 21), each a ratio measured in the same run.
ISSUE_TARGETS = [
    Target("governed / passthrough throughput (64 conn) >= 0.80", "throughput_64c", "governed", "rps", 0.80, "passthrough", True),
    Target("governed / floor throughput (64 conn) >= 1.00", "throughput_64c", "governed", "rps", 1.00, "floor", True),
    Target("responses / passthrough throughput (64 conn) >= 0.75", "throughput_64c", "responses", "rps", 0.75, "passthrough", True),
    Target("governed / floor added latency p50 (1 conn) <= 1.00", "latency_1c", "governed", "added_p50_ms", 1.00, "floor"),
    Target("governed / floor added latency p99 (1 conn) <= 1.20", "latency_1c", "governed", "added_p99_ms", 1.20, "floor"),
    Target(
        "governed / floor stream completion (100x50) <= 1.05, 0 lost", "streams_100x50", "governed", "completion_p50_ms", 1.05,
        "floor", zero="chunks_lost",
    ),
    Target("governed / floor RSS (1,000 open streams) <= 1.20", "open_streams_1000", "governed", "rss_mb", 1.20, "floor"),
    # Issue 17: the Messages API costs no more than the Responses API, embeddings no more than governed chat.
    Target("messages / responses throughput (64 conn) >= 0.90", "throughput_64c", "messages", "rps", 0.90, "responses", True),
    Target("embeddings / governed throughput (64 conn) >= 0.90", "throughput_64c", "embeddings", "rps", 0.90, "governed", True),
]


def target_lines(summary: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """(description, figure, verdict) for every issue target."""
    return [(t.description, *t.evaluate(summary)) for t in ISSUE_TARGETS]


def workers_note(summary: dict[str, dict[str, dict[str, Any]]], workers_target: str, workers: int) -> str | None:
    """Throughput of governed with several workers against governed on one core (information, never a verdict).

    The workers run unpinned, on every core, beside the provider and the load
    generator: on a 2-core host they compete with the load they are measured
    under, so the figure shows that the workers scale, not by how much they would.
    """
    cells = summary.get("throughput_64c", {})
    many, one = cells.get(workers_target), cells.get("governed")
    if many is None or one is None:
        return None
    if "failed" in many:
        return f"note: {workers_target} ({workers} workers) FAILED: {many['failed'].splitlines()[0]}"
    value = ratio(many, one, "rps")
    if value is None:
        return None
    return (
        f"note: {workers_target} ({workers} workers, all cores) serves {many['rps']['median']:.0f} req/s, {value:.2f}x governed"
        f" on one core; indicative only: the workers share the host's cores with the provider and the load"
    )
