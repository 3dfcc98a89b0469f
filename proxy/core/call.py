"""The objects that travel through the unit pipeline: `Call`, `Reply`, `SSEEvent`.

A `Call` is created once per `/v1` request from the raw body bytes. Units read
and change it on the way in; the terminal unit turns it into a `Reply`. A
`Reply` is a complete JSON body or an async iterator of SSE events; a unit that
changes the response wraps that iterator. Untouched events and bodies keep
their original bytes, so nothing is re-serialised unless a unit changed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDictProxy

CHAT = "chat.completions"
RESPONSES = "responses"
MESSAGES = "messages"  # the Anthropic Messages API; the messages unit turns it into CHAT
MESSAGES_COUNT_TOKENS = "messages.count_tokens"  # answered by the messages unit itself
EMBEDDINGS = "embeddings"


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling: the authenticated key and its tenant."""

    tenant: str
    key_id: str
    name: str = ""
    models: frozenset[str] = frozenset()  # empty: every model
    rpm: int | None = None
    max_concurrency: int | None = None
    expires_at: float | None = None
    budget_credits: int | None = None  # the key's budget (metering enforces it)
    budget_period: str | None = None  # "day", "month" or "total"

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


# Used when the pipeline has no auth unit (the passthrough profile).
ANONYMOUS = Principal(tenant="anonymous", key_id="anonymous")


class SSEEvent:
    """One server-sent event, kept as the exact bytes the provider sent.

    `raw` includes the terminating blank line. Parsing is lazy and cached, so an
    event nobody looks at costs nothing beyond being split out of the stream.
    """

    __slots__ = ("raw", "_data", "_json", "_parsed")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._data: bytes | None = None
        self._json: Any = None
        self._parsed = False

    @classmethod
    def from_json(cls, obj: Any, event: str | None = None) -> SSEEvent:
        data = orjson.dumps(obj)
        head = b"event: " + event.encode() + b"\n" if event else b""
        ev = cls(head + b"data: " + data + b"\n\n")
        ev._data = data
        ev._json = obj
        ev._parsed = True
        return ev

    @classmethod
    def with_json(cls, raw: bytes, obj: Any) -> SSEEvent:
        """An event from known bytes whose payload is already parsed as `obj`."""
        ev = cls(raw)
        ev._json = obj
        ev._parsed = True
        return ev

    @property
    def data(self) -> bytes | None:
        """The joined `data:` field values, or None for a comment-only event."""
        if self._data is None:
            parts = []
            for line in self.raw.splitlines():
                if line.startswith(b"data:"):
                    value = line[5:]
                    parts.append(value[1:] if value.startswith(b" ") else value)
            self._data = b"\n".join(parts) if parts else b""
        return self._data or None

    @property
    def is_done(self) -> bool:
        return self.data == b"[DONE]"

    def json(self) -> Any:
        """The parsed JSON payload, or None when the data is absent, [DONE] or not JSON."""
        if not self._parsed:
            self._parsed = True
            data = self.data
            if data and data != b"[DONE]":
                try:
                    self._json = orjson.loads(data)
                except orjson.JSONDecodeError:
                    self._json = None
        return self._json

    def __repr__(self) -> str:
        return f"SSEEvent({self.raw[:80]!r})"


DONE_EVENT = b"data: [DONE]\n\n"


class Call:
    """One `/v1` request as the units see it."""

    __slots__ = (
        "endpoint",
        "route",
        "body",
        "raw",
        "headers",
        "request_id",
        "principal",
        "response_headers",
        "state",
        "started_at",
        "upstream",
        "upstream_latency",
        "usage",
        "usage_source",
        "credits",
        "ledger_kind",
        "session_id",
        "agent",
        "model_defaults_applied",
        "drain",
    )

    def __init__(
        self,
        endpoint: str,
        body: dict[str, Any],
        raw: bytes | None,
        headers: CIMultiDictProxy[str],
        request_id: str,
        started_at: float = 0.0,
    ) -> None:
        self.endpoint = endpoint
        # The endpoint the client called: a translating unit changes `endpoint`
        # (the messages unit makes it CHAT), never this.
        self.route = endpoint
        self.body = body
        # The original bytes; dropped as soon as a unit changes the body.
        self.raw = raw
        self.headers = headers
        self.request_id = request_id
        self.principal: Principal = ANONYMOUS
        # Headers the units want on the client's response (e.g. X-Session-ID).
        self.response_headers: dict[str, str] = {}
        # Scratch space for third-party units, keyed by unit name. Facts one
        # built-in unit leaves for another are the typed fields below.
        self.state: dict[str, Any] = {}
        self.ledger_kind = "request"  # metering's ledger `kind` ("title" for session titles)
        self.session_id: str | None = None  # set by the sessions unit
        # Metering's read of the provider to its end after the client left a stream
        # (`on_disconnect: drain`): the request is in flight until it ends (rate limits wait for it).
        self.drain: asyncio.Task[None] | None = None
        self.started_at = started_at
        # Filled on the way for logs and metrics.
        self.upstream: str | None = None  # name of the upstream that answered
        self.upstream_latency: float | None = None  # seconds until its headers
        self.usage: dict[str, Any] | None = None  # chat-shaped usage, when known
        self.usage_source: str | None = None  # "reported" or "estimated"
        self.credits: int | None = None  # credits charged
        # Set by the agent unit: the server tool calls it ran (middleware.agent.trace.AgentTrace),
        # read by the Responses (mcp_call items) and sessions (stored turn) units.
        self.agent: Any = None
        self.model_defaults_applied = False  # see apply_model_defaults

    @property
    def model(self) -> Any:
        return self.body.get("model")

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    def replace_body(self, body: dict[str, Any]) -> None:
        """Install a changed body; the raw bytes no longer describe it."""
        self.body = body
        self.raw = None

    def set(self, key: str, value: Any) -> None:
        """Change one top-level field of the body."""
        if self.body.get(key, _MISSING) is value:
            return
        self.body[key] = value
        self.raw = None

    def apply_model_defaults(self, defaults: dict[str, Any], system_prompt: str | None) -> None:
        """A model's configured request fields (where the client sent none) and system prompt, once per call.

        Metering applies them before it sizes the hold, so a default `n` or cap
        is held for; the forwarder applies them when no metering ran. The flag
        keeps the second from prepending the system prompt again.
        """
        if self.model_defaults_applied:
            return
        self.model_defaults_applied = True
        if not defaults and not system_prompt:
            return
        body = {**defaults, **self.body}
        messages = body.get("messages")
        if system_prompt and isinstance(messages, list):
            body["messages"] = [{"role": "system", "content": system_prompt}, *messages]
        self.replace_body(body)

    def body_bytes(self) -> bytes:
        if self.raw is None:
            self.raw = orjson.dumps(self.body)
        return self.raw


_MISSING = object()


@dataclass(slots=True, eq=False)
class Reply:
    """What comes back through the pipeline: a JSON body or an SSE event stream.

    A unit that watches or changes a stream wraps ``events`` in a
    `proxy.core.streams.EventStream`: closing the outermost layer then closes
    every layer under it down to the provider connection, even when the client
    left before the first event (a bare async generator would not).
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    events: AsyncIterator[SSEEvent] | None = None
    # How the relay writes an ApiError raised mid-stream (the complete SSE event);
    # None: the chat shape, one `data: {"error": …}` event. Set by units whose
    # protocol has its own error event (the Anthropic `event: error`).
    stream_error: Callable[[Any], bytes] | None = None
    _json: Any = None

    @classmethod
    def from_json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(status=status, headers=headers or {}, body=None, _json=obj)

    @property
    def is_stream(self) -> bool:
        return self.events is not None

    def json(self) -> Any:
        """The parsed body (cached); None when the body is not JSON."""
        if self._json is None and self.body is not None:
            try:
                self._json = orjson.loads(self.body)
            except orjson.JSONDecodeError:
                return None
        return self._json

    def set_json(self, obj: Any, raw: bytes | None = None) -> None:
        """Install a new body; `raw` is `obj` serialised, when the caller already has it."""
        self._json = obj
        self.body = raw

    def body_bytes(self) -> bytes:
        if self.body is None:
            self.body = orjson.dumps(self._json)
        return self.body


Next = Callable[[Call], Awaitable[Reply]]
