"""The usage answer shared by ``GET /admin/usage`` (any tenant) and ``GET /v1/usage`` (the key's own tenant).

Query: ``start``, ``end`` (unix seconds or ISO 8601; default the last 24
hours, widened to whole hours), ``group_by`` (comma-separated ``hour``,
``day``, ``model``, ``key``), filters ``key`` and ``model``, and
``format=csv`` for a CSV export. See proxy/store/usage.py for the buckets.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from proxy.core.errors import invalid_request
from proxy.store.store import Store
from proxy.store.usage import parse_group_by, query_usage, time_range, usage_csv


async def usage_response(store: Store, tenant: str, query: Mapping[str, str], *, key_id: str | None = None) -> web.Response:
    """`key_id` (when given) limits the answer to that key, whatever the query asks."""
    fmt = query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise invalid_request("`format` is `json` or `csv`.", param="format")
    start, end = time_range(query.get("start"), query.get("end"))
    rows = await query_usage(
        store,
        tenant,
        start=start,
        end=end,
        group_by=parse_group_by(query.get("group_by")),
        key_id=key_id if key_id is not None else (query.get("key") or None),
        model=query.get("model") or None,
    )
    if fmt == "csv":
        return web.Response(
            text=usage_csv(rows),
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="usage-{tenant}-{start}-{end}.csv"'},
        )
    return web.json_response({"object": "list", "data": rows})
