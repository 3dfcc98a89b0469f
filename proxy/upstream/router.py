"""Talking to providers: pooled clients, timeouts, failover and circuit breakers.

One keep-alive connection pool (`upstream_client.ConnectionPool`) per
configured upstream, created at start-up and shared by every request.
`UpstreamRouter.send` posts a chat (or embeddings) request to a model's targets in order:
connection errors, timeouts, 5xx and 429 move on to the next attempt
(bounded, jittered, honouring a short `Retry-After`) as long as nothing has
reached the client. A per-upstream breaker skips a target that keeps failing
until its cool-down has passed.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
import structlog

from proxy.core.call import Reply, SSEEvent
from proxy.core.chat_deltas import as_chunks, not_a_completion
from proxy.core.errors import ApiError, UpstreamError, UpstreamRateLimited
from proxy.core.streams import EventStream
from proxy.upstream.headers import request_headers_for_upstream, response_headers_for_client
from proxy.core.settings import RoutingSettings, UpstreamSettings
from proxy.upstream.sse import split_events
from proxy.upstream.client import ConnectionPool, UpstreamConnectionError, UpstreamResponse, UpstreamSetupError
from proxy.core.tls import client_context
from proxy.upstream.egress import egress_proxy

log = structlog.get_logger("sovereign")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Provider endpoints, below the upstream URL's own path (…/v1).
CHAT_PATH = "/chat/completions"
EMBEDDINGS_PATH = "/embeddings"
REDACTED = b"[redacted]"


class Breaker:
    """Counts consecutive failures; open means "skip this upstream for now"."""

    __slots__ = ("threshold", "cooldown", "failures", "open_until")

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0

    def allows(self, now: float) -> bool:
        # After the cool-down one request goes through (half-open); a failure re-opens.
        return now >= self.open_until

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = now + self.cooldown


class Upstream:
    """One provider: its settings, its connection pool and its breaker."""

    def __init__(self, name: str, settings: UpstreamSettings, routing: RoutingSettings) -> None:
        self.name = name
        self.settings = settings
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self.authorization = f"Bearer {key}" if key else None
        self.secret = key.encode() if key else None
        t = settings.timeouts
        # The wait for the response headers is bounded by idle too (as any read is).
        self.header_timeout = min(t.first_byte, t.idle)
        self.breaker = Breaker(routing.breaker_failures, routing.breaker_cooldown)
        self.pool: ConnectionPool | None = None

    async def start(self) -> None:
        s = self.settings
        proxy = egress_proxy(s)  # the environment is read here, once
        context = None
        if s.url.startswith("https://") and s.tls.configured:
            context = client_context(s.tls)
            if not s.tls.verify:
                log.warning("upstream.tls_unverified", upstream=self.name, message="tls.verify is false: the provider's certificate is not checked")
        if proxy is not None:
            log.info("upstream.proxy", upstream=self.name, proxy=proxy.where)
        self.pool = ConnectionPool(
            s.url,
            s.max_connections,
            s.timeouts.connect,
            s.keepalive_seconds,
            ssl_context=context,
            server_name=s.tls.server_name,
            proxy=proxy,
            dns_ttl=s.dns_cache_seconds,
            stagger=s.connect_stagger_seconds,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    def redact(self, data: bytes) -> bytes:
        # find, not `in`: bytes.__contains__ first tries its argument as an
        # integer and formats a TypeError it then discards (≈ 1.9 k instructions).
        if self.secret is not None and data.find(self.secret) != -1:
            return data.replace(self.secret, REDACTED)
        return data


# A chunk with a finish reason (a string, not null), in either spacing providers use.
FINISHED = b'"finish_reason":"'
FINISHED_SPACED = b'"finish_reason": "'
DONE = b"data: [DONE]"  # (bytes, not SSEEvent.is_done: no parse of every event on the pass-through path)
IN_BAND_ERROR = b'data: {"error"'  # a provider's error event (chat_deltas.first_choice reads it)


class _Retryable(Exception):
    def __init__(self, error: ApiError, retry_after: float | None = None) -> None:
        self.error = error
        self.retry_after = retry_after


class UpstreamRouter:
    """Sends chat requests to a model's ordered upstream targets."""

    def __init__(self, upstreams: Mapping[str, UpstreamSettings], routing: RoutingSettings, tracing: Any = None) -> None:
        """`tracing`: `proxy.core.telemetry.Tracing` when traces are on (each attempt is then a span)."""
        self.routing = routing
        self.tracing = tracing
        self.upstreams = {name: Upstream(name, s, routing) for name, s in upstreams.items()}

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()

    async def send(
        self,
        targets: list[str],
        body: bytes,
        client_headers: Mapping[str, str],
        request_id: str,
        stream: bool,
        on_attempt: Any = None,
        path: str = CHAT_PATH,
    ) -> Reply:
        """Forward one request (to `path`: chat completions unless told); returns the first answer that is not retryable."""
        attempts = self.routing.attempts
        last: ApiError | None = None
        headers = request_headers_for_upstream(client_headers)
        headers["Content-Type"] = "application/json"
        headers["X-Request-ID"] = request_id
        if stream:
            headers["Accept"] = "text/event-stream"
        for attempt in range(attempts):
            upstream = self._pick(targets, attempt)
            if upstream is None:
                break
            if on_attempt is not None:
                on_attempt(upstream.name)
            try:
                    if self.tracing is None:
                        return await self._post(upstream, body, headers, stream, path)
                    post = functools.partial(self._post, path=path)
                    return await self.tracing.provider_call(post, upstream, body, headers, stream)
            except _Retryable as exc:
                last = exc.error
                upstream.breaker.failure(time.monotonic())
                if attempt + 1 < attempts:
                    await asyncio.sleep(self._pause(attempt, exc.retry_after))
        if last is None:
            last = UpstreamError("No upstream is available for this model right now.")
        raise last

    def _pick(self, targets: list[str], attempt: int) -> Upstream | None:
        """The attempt-th target in order, skipping open breakers (all open: try anyway)."""
        now = time.monotonic()
        ordered = [self.upstreams[name] for name in targets]
        healthy = [u for u in ordered if u.breaker.allows(now)]
        pool = healthy or ordered
        return pool[attempt % len(pool)] if pool else None

    def _pause(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after <= self.routing.max_retry_after:
            return retry_after
        base = self.routing.backoff_ms / 1000.0 * (2**attempt)
        return random.uniform(0, base)

    async def _post(
        self, upstream: Upstream, body: bytes, headers: dict[str, str], stream: bool, path: str = CHAT_PATH
    ) -> Reply:
        pool = upstream.pool
        assert pool is not None, "upstream not started"
        if upstream.authorization:
            headers = {**headers, "Authorization": upstream.authorization}
        t = upstream.settings.timeouts
        try:
            response = await pool.post(path, headers.items(), body, upstream.header_timeout, t.idle, t.total)
        except TimeoutError:
            raise _Retryable(UpstreamError("The upstream provider timed out.", timeout=True, upstream=upstream.name)) from None
        except UpstreamSetupError as exc:
            # The proxy or TLS failed: say which, so the operator can act (no credentials are in it).
            message = f"Could not reach the upstream provider: {exc}."
            raise _Retryable(UpstreamError(message, upstream=upstream.name)) from None
        except UpstreamConnectionError as exc:
            # The client learns only that the provider could not be reached; the
            # operator's log says why (refused, reset, a TLS alert such as a missing client certificate).
            log.warning("upstream.unreachable", upstream=upstream.name, error=str(exc))
            raise _Retryable(UpstreamError("Could not reach the upstream provider.", upstream=upstream.name)) from None

        status = response.status
        if status >= 400:
            return await self._failure(upstream, response)
        upstream.breaker.success()
        passthrough = response_headers_for_client(response.headers)
        if stream and response.content_type == "text/event-stream":
            # An unfinished body must close the connection, so the provider sees
            # the cancellation; a finished one goes back to the pool.
            events = EventStream(
                self._events(upstream, response),
                on_close=lambda completed: response.release() if completed else response.close(),
            )
            return Reply(status=status, headers=passthrough, events=events)
        try:
            data = await response.read()
        except (UpstreamConnectionError, TimeoutError) as exc:
            # Nothing has reached the client yet: the next target may still serve it.
            upstream.breaker.failure(time.monotonic())
            raise _Retryable(UpstreamError(
                "The upstream provider failed while sending its response.",
                timeout=isinstance(exc, TimeoutError),
                upstream=upstream.name,
            )) from None
        finally:
            response.release()
        data = upstream.redact(data)
        if not _looks_like_json(data):
            # A 200 that is no JSON document (cut short, empty, an SSE or HTML body) is the
            # provider failing, not an answer to relay (unbilled: it carries no usage).
            upstream.breaker.failure(time.monotonic())
            log.warning("upstream.malformed_reply", upstream=upstream.name, status=status, bytes=len(data))
            raise _Retryable(UpstreamError("The upstream provider sent a malformed response.", upstream=upstream.name))
        # OpenRouter-style failures come as a 200 whose body is only an error (no
        # client SDK reads that as one): the provider failing, like a 5xx. A
        # provider that ignored `stream` still gives the client the stream it asked for.
        failed = data.lstrip()[:8] == b'{"error"'
        if failed or stream:
            try:
                completion = orjson.loads(data)
            except orjson.JSONDecodeError:
                completion = None
            if failed or not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
                upstream.breaker.failure(time.monotonic())
                raise _Retryable(not_a_completion(completion))
            return Reply(status=status, headers=passthrough, events=_as_events(completion))
        return Reply(status=status, headers=passthrough, body=data)

    async def _failure(self, upstream: Upstream, response: UpstreamResponse) -> Reply:
        status = response.status
        try:
            data = upstream.redact(await response.read())
        except (UpstreamConnectionError, TimeoutError):
            data = b""
        finally:
            response.release()
        if status in RETRYABLE_STATUS:
            retry_after = _retry_after(response.headers.get("Retry-After"))
            if status == 429:
                error: UpstreamError = UpstreamRateLimited(
                    "The upstream provider is rate limiting the gateway; retry later.",
                    retry_after=max(1, math.ceil(retry_after or 0)),  # (SDKs ignore a Retry-After of 0)
                    upstream=upstream.name,
                )
            else:
                error = UpstreamError(f"The upstream provider failed (HTTP {status}).", upstream=upstream.name)
            raise _Retryable(error, retry_after)
        if status in (401, 403):
            # The provider refused the gateway's own key: the operator's problem,
            # and the client must learn nothing about that key.
            upstream.breaker.failure(time.monotonic())
            raise UpstreamError("The upstream provider refused the gateway's credentials.", upstream=upstream.name)
        if status == 402:
            # The operator's account at the provider is out of funds: not the
            # client's credits (whose 402 is the gateway's own), so a 502, and the next target may serve.
            upstream.breaker.failure(time.monotonic())
            raise _Retryable(UpstreamError("The upstream provider refused the gateway's account (payment required).",
                                           upstream=upstream.name))
        # Any other 4xx is about the client's request: relay it with its status.
        upstream.breaker.success()
        return Reply(status=status, headers={}, body=_openai_error_body(status, data))

    @staticmethod
    async def _events(upstream: Upstream, response: UpstreamResponse) -> AsyncIterator[SSEEvent]:
        """The provider's events, its transport failures as `UpstreamError`s.

        A stream that closes cleanly before it finished (no ``[DONE]`` and no
        ``finish_reason``: an empty body, a provider that gave up) is a failure
        too, so the client gets the error event rather than a silent end.
        """
        finished = False
        try:
            async for event in split_events(response.chunks(), upstream.secret):
                if not finished:
                    raw = event.raw
                    # find, not `in` (see Upstream.redact): this runs on every event until the last.
                    # The provider's own error event ends the stream too (no second error after it).
                    finished = (raw.find(FINISHED) != -1 or raw.find(FINISHED_SPACED) != -1 or raw.find(DONE) != -1
                                or raw.startswith(IN_BAND_ERROR))
                yield event
        except TimeoutError:
            raise UpstreamError("The upstream provider stopped sending.", timeout=True, upstream=upstream.name) from None
        except UpstreamConnectionError:
            raise UpstreamError("The upstream provider broke off the stream.", upstream=upstream.name) from None
        if not finished:
            raise UpstreamError("The upstream provider ended the stream early.", upstream=upstream.name)


async def _as_events(completion: dict[str, Any]) -> AsyncIterator[SSEEvent]:
    """The stream a finished completion adds up to (`chat_deltas.as_chunks`), then `[DONE]`."""
    for chunk in as_chunks(completion):
        yield SSEEvent.from_json(chunk)
    yield SSEEvent(DONE + b"\n\n")


def _looks_like_json(data: bytes) -> bool:
    """An object or array from its first to its last byte: what a body cut short, empty, SSE or HTML is not.

    Not a parse: the pass-through path relays the bytes and a full parse costs it
    ~17 k instructions a request (bench/RESULTS.md); the units that read the body parse it anyway.
    """
    body = data.strip()
    return (body[:1] == b"{" and body[-1:] == b"}") or (body[:1] == b"[" and body[-1:] == b"]")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _openai_error_body(status: int, data: bytes) -> bytes:
    """The provider's error body if it is OpenAI-shaped, else one built around it."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return data
    text = data.decode("utf-8", "replace")[:500] or f"The upstream provider answered HTTP {status}."
    return ApiError(status, text, code="upstream_error").to_json()
