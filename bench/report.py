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
    """One of the issue's performance targets: ``figure <= limit`` (or ``>=`` when ``at_least``)."""

    description: str
    workload: str
    target: str
    metric: str
    limit: float
    at_least: bool = False
    relative_to: str | None = None  # compare the ratio to this target's median instead of the raw figure

    def evaluate(self, summary: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, str]:
        """(figure text, verdict): verdict is PASS, MISS, FAILED or n/a."""
        cells = summary.get(self.workload, {})
        cell = cells.get(self.target)
        if cell is None:
            return "-", "n/a"
        if "failed" in cell:
            return "FAILED", "FAILED"
        if self.relative_to is not None:
            value = ratio(cell, cells.get(self.relative_to), self.metric)
            if value is None:
                return "-", "n/a"
            text = f"{value * 100:.0f}%"
        else:
            if self.metric not in cell:
                return "-", "n/a"
            value = cell[self.metric]["median"]
            text = f"{value:.2f}"
        ok = value >= self.limit if self.at_least else value <= self.limit
        return text, "PASS" if ok else "MISS"


# The issue's own bare aiohttp pass-through added this much (p50, one connection):
# its absolute latency targets were set on a machine where the floor costs about that.
ISSUE_FLOOR_ADDED_P50_MS = 0.33
GOVERNED_ADDED_P50_LIMIT_MS = 0.6


ISSUE_TARGETS = [
    Target("governed throughput >= 60% of floor (64 conn)", "throughput_64c", "governed", "rps", 0.60, True, "floor"),
    Target("passthrough throughput >= 90% of floor (64 conn)", "throughput_64c", "passthrough", "rps", 0.90, True, "floor"),
    Target("governed added latency p50 <= 0.6 ms (1 conn)", "latency_1c", "governed", "added_p50_ms", GOVERNED_ADDED_P50_LIMIT_MS),
    Target("governed added latency p99 <= 1.5 ms (1 conn)", "latency_1c", "governed", "added_p99_ms", 1.5),
    Target("governed stream completion <= 115% of floor (100x50)", "streams_100x50", "governed", "completion_p50_ms", 1.15, False, "floor"),
    Target("governed RSS <= 150 MB (1,000 open streams)", "open_streams_1000", "governed", "rss_mb", 150.0),
]


def target_lines(summary: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """(description, figure, verdict) for every issue target."""
    return [(t.description, *t.evaluate(summary)) for t in ISSUE_TARGETS]


def machine_note(summary: dict[str, dict[str, dict[str, Any]]]) -> str | None:
    """This run's floor against the issue's, and governed's distance from it (read with the absolute targets).

    The floor's added latency is mostly cross-core wake-ups, which the machine
    sets: when it is well above the issue's, the absolute p50 target measures
    the machine as much as the gateway. Information only, never a verdict.
    """
    cells = summary.get("latency_1c", {})
    floor, governed = cells.get("floor", {}), cells.get("governed", {})
    if "added_p50_ms" not in floor:
        return None
    floor_ms = floor["added_p50_ms"]["median"]
    note = f"note: the floor adds {floor_ms:.2f} ms p50 in this run; the issue measured +{ISSUE_FLOOR_ADDED_P50_MS:.2f} ms for its own"
    if "added_p50_ms" in governed:
        budget = GOVERNED_ADDED_P50_LIMIT_MS - ISSUE_FLOOR_ADDED_P50_MS
        note += (
            f". Governed adds {governed['added_p50_ms']['median'] - floor_ms:+.2f} ms over this run's floor"
            f" (the {GOVERNED_ADDED_P50_LIMIT_MS} ms target allows {budget:.2f} ms over the issue's floor)"
        )
    return note
