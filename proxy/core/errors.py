"""OpenAI-shaped errors.

Every error a client or operator sees has the shape
``{"error": {"message", "type", "param", "code"}}``. Code anywhere in the
gateway raises :class:`ApiError`; the HTTP layer renders it, and the relay
renders it as an SSE event once a stream has started.
"""

from __future__ import annotations

from typing import Any

import orjson

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"


class ApiError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


def invalid_request(message: str, *, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def model_not_found(model: object) -> ApiError:
    # One answer for "unknown" and "not allowed for this key", so nothing leaks.
    shown = model if isinstance(model, str) and len(model) <= 256 else "requested"
    return ApiError(
        404,
        f"The model `{shown}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, f"No such {what}.", type=INVALID_REQUEST, code="not_found")


def store_unavailable() -> ApiError:
    return ApiError(
        503,
        "The gateway's store is unavailable; the request was not served. Retry shortly.",
        type=SERVER,
        code="store_unavailable",
    )


class UpstreamError(ApiError):
    """The provider failed or timed out (502/504). Raised before or during a stream."""

    def __init__(self, message: str, *, timeout: bool = False, upstream: str | None = None) -> None:
        super().__init__(
            504 if timeout else 502,
            message,
            type=SERVER,
            code="upstream_timeout" if timeout else "upstream_error",
        )
        self.upstream = upstream
