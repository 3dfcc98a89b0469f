"""The gateway's errors: one small typed tree, rendered in one place.

Every error a client sees has an HTTP status and an OpenAI-shaped body
``{"error": {"message", "type", "param", "code"}}``. Code anywhere raises a
class from this tree; the edge middleware (`proxy.web.middlewares`) renders
it as a response, and the relay renders it as an in-band event once a stream
has started. Nothing else turns errors into bytes.

    ApiError                      any error with a status and an OpenAI error body
    ├── ClientError               4xx: the request itself is at fault
    │   ├── InvalidRequest        400 invalid_value, invalid_json, missing_required_parameter, …
    │   ├── NotFound              404 not_found, model_not_found
    │   └── RequestTooLarge       413 request_too_large
    ├── AuthenticationFailed      401 invalid_api_key
    ├── CreditsExhausted          402 insufficient_credits
    ├── RateLimited               429 rate_limit_exceeded (this gateway's per-key limits)
    ├── UpstreamError             502 upstream_error / 504 upstream_timeout (the provider)
    │   └── UpstreamRateLimited   429 rate_limit_exceeded (the provider limits the gateway)
    └── ServiceUnavailable        503
        ├── StoreUnavailable      503 store_unavailable (the store's boundary raises it for
        │                         every redis or socket error, see `proxy.store.store`)
        └── Draining              503 draining (the replica is shutting down)

A status or code that needs no class of its own (405, 408, 409, 500) is a
plain `ApiError` or `ClientError`. Metrics count refusals by class, so an
upstream 429 is never mistaken for one of the gateway's own rate limits.
"""

from __future__ import annotations

from typing import Any

import orjson

# OpenAI error `type` values.
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
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class ClientError(ApiError):
    """A 4xx the client can fix by changing its request."""


class InvalidRequest(ClientError):
    """400: a malformed or unacceptable request; `param` names the field."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(400, message, code=code, param=param)


class NotFound(ClientError):
    """404: an unknown (or not visible) model, route or resource."""

    def __init__(self, message: str, *, code: str = "not_found", param: str | None = None) -> None:
        super().__init__(404, message, code=code, param=param)


class RequestTooLarge(ClientError):
    """413: the body is over the configured limit."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message, code="request_too_large")


class AuthenticationFailed(ApiError):
    """401: a missing, malformed, unknown, revoked or expired key."""

    def __init__(self, message: str) -> None:
        super().__init__(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="sovereign"'}
        )


class CreditsExhausted(ApiError):
    """402: the tenant cannot cover the request; retrying will not help."""

    def __init__(self, message: str, *, code: str = "insufficient_credits") -> None:
        super().__init__(402, message, code=code, headers={"x-should-retry": "false"})


class RateLimited(ApiError):
    """429: one of this gateway's per-key limits; `Retry-After` says when to retry."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(
            429, message, type=RATE_LIMIT, code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)}
        )


class UpstreamError(ApiError):
    """The provider failed or timed out (502/504). Raised before or during a stream."""

    def __init__(
        self, message: str, *, timeout: bool = False, upstream: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(
            status or (504 if timeout else 502),
            message,
            type=SERVER,
            code="upstream_timeout" if timeout else "upstream_error",
        )
        self.upstream = upstream


class UpstreamRateLimited(UpstreamError):
    """429 from the provider: it limits the gateway's account, not this client's key."""

    def __init__(self, message: str, *, retry_after: int, upstream: str | None = None) -> None:
        super().__init__(message, upstream=upstream, status=429)
        self.type = RATE_LIMIT
        self.code = "rate_limit_exceeded"
        self.headers = {"Retry-After": str(retry_after)}


class ServiceUnavailable(ApiError):
    """503: the gateway cannot serve this request right now; retry shortly."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(503, message, type=SERVER, code=code)


class StoreUnavailable(ServiceUnavailable):
    """The store (Redis) is unreachable or timed out: fail closed, never serve unmetered."""

    def __init__(self, message: str = "The gateway's store is unavailable; the request was not served. Retry shortly.") -> None:
        super().__init__(message, code="store_unavailable")


class Draining(ServiceUnavailable):
    """The replica is shutting down and takes no new work."""

    def __init__(self) -> None:
        super().__init__("The gateway is shutting down; retry on another replica.", code="draining")


# -- constructors for the common cases ---------------------------------------------
def invalid_request(message: str, *, param: str | None = None, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def model_not_found(model: object) -> NotFound:
    # One answer for "unknown" and "not allowed for this key", so nothing leaks.
    shown = model if isinstance(model, str) and len(model) <= 256 else "requested"
    return NotFound(
        f"The model `{shown}` does not exist or you do not have access to it.", code="model_not_found", param="model"
    )


def wrong_model_kind(model: str, embeddings_route: bool) -> InvalidRequest:
    """An embedding model on a chat route, or a chat model on /v1/embeddings (400 naming the model)."""
    if embeddings_route:
        message = f"The model `{model}` is a chat model; /v1/embeddings serves only models of kind `embeddings`."
    else:
        message = f"The model `{model}` is an embedding model; use it with /v1/embeddings."
    return InvalidRequest(message, param="model")


def not_found(what: str = "resource") -> NotFound:
    return NotFound(f"No such {what}.")


def store_unavailable() -> StoreUnavailable:
    return StoreUnavailable()
