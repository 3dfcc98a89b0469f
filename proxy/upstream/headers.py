"""Which headers cross the gateway, in each direction.

Hop-by-hop headers (RFC 9110 §7.6.1) never cross. The client's credentials
never reach the provider, and the provider's account details (rate-limit
budgets, organisation) never reach the client.
"""

from __future__ import annotations

from collections.abc import Mapping

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# Request headers the gateway sets itself or must not pass on.
_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "accept-encoding",
    "authorization",
    "cookie",
    "api-key",
    "x-api-key",
    "x-session-id",
    "x-request-id",
    "openai-organization",
    "openai-project",
    # The Anthropic protocol's own headers: the gateway terminates that protocol.
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
}

# Response headers the gateway sets itself or that describe the operator's account.
_NOT_RETURNED = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "content-type",
    "date",
    "server",
    "set-cookie",
    "x-request-id",
    "openai-organization",
    "openai-project",
    "alt-svc",
    "via",
}
_NOT_RETURNED_PREFIXES = ("x-ratelimit-", "cf-", "x-envoy-")


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    # Headers named in `Connection` are hop-by-hop for this message too.
    value = headers.get("Connection") or headers.get("connection")
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


def request_headers_for_upstream(client_headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers that may travel on to the provider."""
    extra = _connection_tokens(client_headers)
    drop = _NOT_FORWARDED | extra if extra else _NOT_FORWARDED
    return {name: value for name, value in client_headers.items() if name.lower() not in drop}


def response_headers_for_client(upstream_headers: Mapping[str, str]) -> dict[str, str]:
    """The provider's response headers that may travel back to the client."""
    extra = _connection_tokens(upstream_headers)
    drop = _NOT_RETURNED | extra if extra else _NOT_RETURNED
    return {
        name: value
        for name, value in upstream_headers.items()
        if (lower := name.lower()) not in drop and not lower.startswith(_NOT_RETURNED_PREFIXES)
    }
