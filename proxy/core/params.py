"""What the gateway reads from a request besides its body, with one error for each mistake.

- `field_path(loc)`: a pydantic error location as the path a client or operator
  reads (``messages[2].content[0].type``), used for request bodies, admin bodies
  and the configuration alike.
- `query_limit(query, default, maximum)`: the ``limit`` of a listing route.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from proxy.core.errors import InvalidRequest, invalid_request


# The segments pydantic adds to a location for the member of a union that failed
# (`expires_at.int`): its own names, not the client's fields.
_UNION_MEMBERS = frozenset({"int", "float", "str", "bool", "constrained-int", "constrained-float", "constrained-str"})


def field_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as the field path a client or operator wrote (`messages[2].content`)."""
    path = ""
    for part in loc:
        if isinstance(part, str) and (part in _UNION_MEMBERS or part.startswith("function-")):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def query_limit(query: Mapping[str, str], default: int, maximum: int) -> int:
    """``limit`` from the query string: an integer from 1 to `maximum`, else a 400 naming it."""
    raw = query.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= maximum:
        raise _bad_limit(maximum)
    return value


def _bad_limit(maximum: int) -> InvalidRequest:
    return invalid_request(f"`limit` is an integer from 1 to {maximum}.", param="limit")
