"""The Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) on chat completions.

On the way in, a Messages body becomes a chat body (`request.to_chat`) and
`call.endpoint` becomes CHAT, so the units after this one (sessions, legacy
functions, metering) and the provider see an ordinary chat call. On the way
back, the chat completion becomes a Message (`reply.to_message`), the chat
chunk stream becomes the Anthropic event sequence (`stream.StreamTranslator`),
with `ping` events while the model has said nothing yet, and a provider
error reply (relayed 4xx) is rewritten into the Anthropic error shape.

Errors on these routes have Anthropic's shape: the unit provides
`errors.render` as the renderer of the `/v1/messages` prefix (used by the
HTTP error middleware), and sets `errors.stream_event` as the reply's
renderer of a mid-stream failure (used by the relay).

`count_tokens` is answered here with the gateway's own prompt estimate of the
translated chat body (the one metering holds credits for), free of charge and
without calling the provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import Field

from proxy.core.call import CHAT, MESSAGES, MESSAGES_COUNT_TOKENS, Call, Next, Reply, SSEEvent
from proxy.core.chat_deltas import not_a_completion
from proxy.core.pipeline import ErrorRenderer, Unit, UnitSettings
from proxy.core.streams import EventStream, keepalive

from middleware.messages import errors
from middleware.messages.reply import new_message_id, to_message
from middleware.messages.request import renamed_tools, to_chat
from middleware.messages.stream import PING, StreamTranslator
from middleware.metering.pricing import prompt_estimate

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway

ROUTE_PREFIX = "/v1/messages"
DEFAULT_CHARS_PER_TOKEN = 3.0  # metering's default, when metering is not in the pipeline


class MessagesUnit(Unit):
    """Maps the Anthropic Messages API onto the chat-completions pipeline."""

    name = "messages"

    class Settings(UnitSettings):
        ping_seconds: float = Field(
            10.0, gt=0, description="Send an Anthropic `ping` event after this many seconds in which a stream's model has produced nothing yet."
        )

    settings: Settings

    def __init__(self, settings: Settings, gateway: Gateway) -> None:
        super().__init__(settings, gateway)
        metering = (gateway.settings.units.get("metering") or {}) if "metering" in gateway.settings.pipeline else {}
        # The same bytes-per-token as metering's hold estimate, so count_tokens tells what is held.
        self.chars_per_token = float(metering.get("chars_per_token", DEFAULT_CHARS_PER_TOKEN))

    def error_renderers(self) -> dict[str, ErrorRenderer]:
        return {ROUTE_PREFIX: errors.render}

    def request_id_headers(self) -> dict[str, str]:
        # The Anthropic SDKs read `request-id` (`message._request_id`, `APIStatusError.request_id`).
        return {ROUTE_PREFIX: "request-id"}

    def estimate(self, chat: dict[str, Any]) -> int:
        return prompt_estimate(len(orjson.dumps(chat)), len(chat["messages"]), self.chars_per_token)

    async def __call__(self, call: Call, next: Next) -> Reply:
        if call.endpoint == MESSAGES_COUNT_TOKENS:
            return Reply.from_json({"input_tokens": self.estimate(to_chat(call.body))})
        if call.endpoint != MESSAGES:
            return await next(call)
        body = call.body
        model, stop_sequences = body.get("model"), body.get("stop_sequences")
        chat, names = to_chat(body), renamed_tools(body)
        call.replace_body(chat)
        call.endpoint = CHAT  # from here on an ordinary chat call (sessions, metering, provider)
        message_id = new_message_id()
        reply = await next(call)
        if reply.status >= 400:
            if reply.events is None:  # the provider's OpenAI-shaped 4xx, in Anthropic's shape
                reply.set_json(errors.from_openai(reply.status, reply.body_bytes(), call.request_id))
            return reply
        if reply.events is not None:  # (also a provider's completion the router streams, when it ignored `stream`)
            translator = StreamTranslator(message_id, model, stop_sequences, self.estimate(chat), names)
            reply.events = EventStream(reply.events, transform=lambda chunks: self._translate(chunks, translator, call))
            reply.stream_error = errors.stream_event
            return reply
        completion = reply.json()
        if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
            raise not_a_completion(completion)
        if not isinstance(completion.get("usage"), dict) and isinstance(call.usage, dict):
            completion["usage"] = call.usage  # none reported: what metering billed (its estimate)
        reply.set_json(to_message(completion, message_id, model, stop_sequences, names))
        return reply

    async def _translate(self, chunks: AsyncIterator[SSEEvent], translator: StreamTranslator, call: Call) -> AsyncIterator[SSEEvent]:
        """The Anthropic events for the chat chunks (an `EventStream` transform: it closes `chunks`)."""
        for event in translator.start():
            yield event
        # Pings until the model has opened its first block (a ping after it would say nothing).
        async for chunk_event in keepalive(chunks, self.settings.ping_seconds, PING, until=lambda: translator.talking):
            if chunk_event is PING:
                yield PING
                continue
            chunk = chunk_event.json()
            if isinstance(chunk, dict):
                for event in translator.chunk(chunk):
                    yield event
            elif chunk_event.is_done:
                translator.saw_done = True
        # Metering has settled by now (the stream under this one ended): without
        # reported usage, call.usage is the estimate it billed, which the client sees too.
        for event in translator.finish(call.usage):
            yield event
