"""Gateway errors in the Anthropic shape: ``{"type": "error", "error": {"type", "message"}}``.

One table maps the gateway's status (and a few codes) to Anthropic's error
types, so the Anthropic SDKs raise their matching exception classes
(BadRequestError, AuthenticationError, PaymentRequiredError, NotFoundError,
RateLimitError, InternalServerError, OverloadedError, …). Headers such as
``retry-after`` and ``x-should-retry`` travel unchanged with the response.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.errors import ApiError, Draining, UpstreamRateLimited

# Anthropic error type per HTTP status (Anthropic's own table of statuses).
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OVERLOADED = 529


def status_of(error: ApiError) -> int:
    """The status on this route: provider saturation (the provider rate-limits the
    gateway) and a draining replica are Anthropic's 529 `overloaded_error`, which
    the SDKs retry; everything else keeps the gateway's status."""
    if isinstance(error, (UpstreamRateLimited, Draining)):
        return OVERLOADED
    return error.status


def error_type(status: int) -> str:
    if status in TYPES:
        return TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def message_of(error: ApiError) -> str:
    """The message, with the field path in it (Anthropic errors have no `param`)."""
    param = error.param
    if param and param not in error.message:
        return f"{param}: {error.message}"
    return error.message


def error_body(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def render(error: ApiError, request_id: str) -> tuple[int, bytes]:
    """(status, body) of an ApiError on an Anthropic route (the gateway's error renderer hook)."""
    status = status_of(error)
    return status, orjson.dumps(error_body(status, message_of(error), request_id))


def stream_event(error: ApiError) -> bytes:
    """The `error` event of a stream that failed after it started."""
    data = orjson.dumps(error_body(status_of(error), message_of(error)))
    return b"event: error\ndata: " + data + b"\n\n"


def from_openai(status: int, body: bytes, request_id: str | None = None) -> dict[str, Any]:
    """A provider's OpenAI-shaped error reply (relayed 4xx) in the Anthropic shape."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = f"The upstream provider answered HTTP {status}."
    # The provider's `param` is left out: it is a path in the translated chat
    # body (`messages[3]` there is not the client's `messages[3]`).
    return error_body(status, message, request_id)
