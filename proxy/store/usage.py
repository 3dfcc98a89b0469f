"""Usage aggregates: where the settlement script writes them, and how they are read.

``hold_settle`` (through ``middleware/metering/usage.lua``) adds every charged
request to two buckets in the tenant's slot, with no extra round trip:

* ``usage:h:<hour start>``: a HASH per UTC hour, fields ``<key id>|<model>|<metric>``
  (metrics ``requests``, ``input_tokens``, ``output_tokens``, ``credits``),
  expiring ``usage.retention_days`` after the hour ends;
* ``usage:d:<day start>``: the same per UTC day, kept ``usage.daily_retention_days``.

A request lands in the bucket of its ledger entry's ``created_at``, so for any
range of whole buckets the aggregates and the ledger agree exactly.

Queries (`query_usage`) take ``start``/``end`` as unix seconds or ISO 8601
(``2026-12-01``, ``2026-12-01T10:00:00Z``; no zone means UTC); the range is
widened to whole hours. Whole UTC days inside the range are read from the
daily buckets unless the answer is grouped by hour, the rest from hourly
ones; so beyond the hourly retention usage is still answered, by day.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime, timezone
from typing import Any

from proxy.core.errors import invalid_request
from proxy.store.store import Store

HOUR = 3600
DAY = 86400
METRICS = ("requests", "input_tokens", "output_tokens", "credits")
GROUPS = ("hour", "day", "model", "key")
MAX_HOURLY_BUCKETS = 24 * 93  # an hour-grouped answer covers at most ~3 months
MAX_DAYS = 366 * 3


def bucket_key(store: Store, tenant: str, resolution: str, start: int) -> str:
    """The key of one bucket: resolution "h" (hour) or "d" (day), `start` its first second."""
    return store.tenant_key(tenant, "usage", resolution, str(start))


def settle_buckets(store: Store, tenant: str, created: int, hourly_days: int, daily_days: int) -> tuple[list[str], list[int]]:
    """The hour and day buckets of a charge at `created`, and the unix times they expire."""
    hour = created - created % HOUR
    day = created - created % DAY
    keys = [bucket_key(store, tenant, "h", hour), bucket_key(store, tenant, "d", day)]
    return keys, [hour + HOUR + hourly_days * DAY, day + DAY + daily_days * DAY]


def parse_time(value: str | None, param: str, default: int) -> int:
    """Unix seconds from a query parameter: an integer, or an ISO 8601 date or date-time."""
    if value is None or value == "":
        return default
    digits = value.removeprefix("-")
    # ASCII only: str.isdigit accepts "¹" and other digits int() refuses. At most
    # 12 digits (unix seconds up to the year 33658); longer is not a time.
    if digits.isascii() and digits.isdigit() and len(digits) <= 12:
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid_request(f"`{param}` is unix seconds or an ISO 8601 date or date-time.", param=param) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())


def parse_group_by(value: str | None) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in (value or "").split(",") if p.strip())
    for part in parts:
        if part not in GROUPS:
            raise invalid_request(f"`group_by` is a comma-separated list of {', '.join(GROUPS)}.", param="group_by")
    if "hour" in parts and "day" in parts:
        raise invalid_request("`group_by` takes `hour` or `day`, not both.", param="group_by")
    return parts


def time_range(start_raw: str | None, end_raw: str | None) -> tuple[int, int]:
    """[start, end) widened to whole hours; default: the last 24 hours."""
    now = int(time.time())
    end = parse_time(end_raw, "end", now)
    start = parse_time(start_raw, "start", end - DAY)
    start -= start % HOUR
    end = end if end % HOUR == 0 else end - end % HOUR + HOUR
    if end <= start:
        raise invalid_request("`end` must be after `start`.", param="end")
    if end - start > MAX_DAYS * DAY:
        raise invalid_request(f"A usage query covers at most {MAX_DAYS} days.", param="start")
    return start, end


def _buckets(start: int, end: int, by_hour: bool) -> list[tuple[str, int, int]]:
    """(resolution, bucket start, bucket end) covering [start, end): whole days by day unless `by_hour`."""
    out: list[tuple[str, int, int]] = []
    at = start
    while at < end:
        day_end = at - at % DAY + DAY
        if not by_hour and at % DAY == 0 and day_end <= end:
            out.append(("d", at, day_end))
            at = day_end
        else:
            out.append(("h", at, at + HOUR))
            at += HOUR
    return out


async def query_usage(
    store: Store,
    tenant: str,
    *,
    start: int,
    end: int,
    group_by: tuple[str, ...] = (),
    key_id: str | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of `{"start", "end", "tenant", "key_id"?, "model"?, metrics…}`, ordered by time then key/model."""
    by_hour, by_day = "hour" in group_by, "day" in group_by
    buckets = _buckets(start, end, by_hour)
    if by_hour and len(buckets) > MAX_HOURLY_BUCKETS:
        raise invalid_request(f"An hour-grouped query covers at most {MAX_HOURLY_BUCKETS // 24} days.", param="start")
    async with store.redis.pipeline(transaction=False) as pipe:
        for resolution, at, _ in buckets:
            pipe.hgetall(bucket_key(store, tenant, resolution, at))
        results = await pipe.execute()
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for (_, at, until), fields in zip(buckets, results, strict=True):
        if by_hour:
            span = (at, until)
        elif by_day:
            span = (at - at % DAY, at - at % DAY + DAY)
        else:
            span = (start, end)
        for field, count in fields.items():
            key, _, rest = field.partition("|")
            name, _, metric = rest.rpartition("|")
            if metric not in METRICS or (key_id is not None and key != key_id) or (model is not None and name != model):
                continue
            group = (span, key if "key" in group_by else None, name if "model" in group_by else None)
            row = rows.get(group)
            if row is None:
                row = rows[group] = {"start": span[0], "end": span[1], "tenant": tenant}
                if "key" in group_by:
                    row["key_id"] = key
                if "model" in group_by:
                    row["model"] = name
                row.update(dict.fromkeys(METRICS, 0))
            row[metric] += int(count)
    return [rows[group] for group in sorted(rows, key=lambda g: (g[0], g[1] or "", g[2] or ""))]


def usage_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV with a header line (the JSON fields, times as unix seconds)."""
    columns = ["start", "end", "tenant", "key_id", "model", *METRICS]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()
