"""The terminal unit: resolve the public model and forward to its upstream.

It maps the public model name (or alias) to the provider's model name,
posts embeddings calls to the provider's `/embeddings` and every other call to
its `/chat/completions` (a model of the other kind is a 400 naming it),
applies the model's system prompt and defaults (unless metering already
did), and returns the provider's reply
untouched: a JSON body or a stream of raw SSE events (a stream of several
choices is checked to finish each, as the router checks one).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from proxy.core.call import EMBEDDINGS, MESSAGES, MESSAGES_COUNT_TOKENS, Call, Reply, SSEEvent
from proxy.core.errors import ApiError, UpstreamError, model_not_found, wrong_model_kind
from proxy.core.streams import EventStream
from proxy.upstream.router import EMBEDDINGS_PATH

# Endpoints a unit must translate before the provider can serve them.
UNTRANSLATED = frozenset({MESSAGES, MESSAGES_COUNT_TOKENS})

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway


class Forwarder:
    """Callable terminal of the pipeline; one per process."""

    def __init__(self, gateway: Gateway) -> None:
        self.settings = gateway.settings
        self.router = gateway.router
        # Provider model name per public name, computed once.
        self._upstream_model: dict[str, str] = {}
        for public in self.settings.models:
            resolved = self.settings.resolve_model(public)
            assert resolved is not None
            target_name, target = resolved
            default = self.settings.upstreams[target.targets[0]].model
            self._upstream_model[public] = target.upstream_model or default or target_name
        self._embeddings = frozenset(name for name in self.settings.models if self.settings.model_kind(name) == "embeddings")

    async def __call__(self, call: Call) -> Reply:
        if call.endpoint in UNTRANSLATED:
            # No unit turned this call into a chat call: the route is not served here.
            raise ApiError(404, "This route is not served: the `messages` unit is not in the pipeline.", code="not_found")
        public = call.model
        if not isinstance(public, str) or public not in self._upstream_model or not call.principal.may_use(public):
            raise model_not_found(public)
        embeddings = call.endpoint == EMBEDDINGS
        if (public in self._embeddings) != embeddings:
            raise wrong_model_kind(public, embeddings)
        entry = self.settings.models[public]
        if entry.defaults or entry.system_prompt:
            call.apply_model_defaults(entry.defaults, entry.system_prompt)  # once: metering may have
        resolved = self.settings.resolve_model(public)
        assert resolved is not None
        target = resolved[1]
        call.set("model", self._upstream_model[public])
        started = time.monotonic()

        def on_attempt(name: str) -> None:
            call.upstream = name

        if embeddings:
            reply = await self.router.send(
                target.targets, call.body_bytes(), call.headers, call.request_id, False, on_attempt, EMBEDDINGS_PATH
            )
        else:
            reply = await self.router.send(
                target.targets, call.body_bytes(), call.headers, call.request_id, call.stream, on_attempt
            )
        call.upstream_latency = time.monotonic() - started
        if reply.events is not None:
            n = call.body.get("n")
            if type(n) is int and n > 1:
                # The router takes a stream as finished at its first finish_reason (or [DONE]);
                # with several choices, each must finish (rare enough to parse every chunk for).
                events = reply.events
                reply.events = EventStream(events, transform=lambda chunks: _every_choice_finishes(chunks, n, call.upstream))
        return reply


async def _every_choice_finishes(events: AsyncIterator[SSEEvent], n: int, upstream: str | None) -> AsyncIterator[SSEEvent]:
    """The stream as it comes; an error at its end when it closed before each of its `n` choices finished."""
    finished: set[Any] = set()
    done = False
    async for event in events:
        if event.is_done:
            done = True
        else:
            chunk = event.json()
            for choice in (chunk.get("choices") or ()) if isinstance(chunk, dict) else ():
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    finished.add(choice.get("index", 0))
        yield event
    if not done and len(finished) < n:
        raise UpstreamError("The upstream provider ended the stream early.", upstream=upstream)

