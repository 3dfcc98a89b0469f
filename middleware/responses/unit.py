"""The Responses API (`POST /v1/responses`) on top of chat completions.

On the way in, a Responses body becomes a chat body (`responses_request`);
`call.endpoint` stays RESPONSES, so later units see a chat-shaped body. On the
way back, the chat completion becomes a Response object, or the chat chunk
stream becomes the Responses event stream (`responses_stream`); a provider
failure mid-stream becomes `error` + `response.failed`. Provider errors before
any output (4xx replies, raised ApiErrors) pass through unchanged; a 200 reply
that is no completion (an `{"error": …}` body) is a 502. A provider that
answers a streamed request with JSON still gives the client the events.

With `store` (default true) the response, its input items and the
conversation so far are kept per tenant (`responses_store`), which serves
`previous_response_id`, `item_reference` inputs (any stored item of the
tenant, by id) and the routes `GET`/`DELETE /v1/responses/{id}` and
`GET /v1/responses/{id}/input_items`. A JSON reply is stored before it is
returned (an immediate GET finds it); a stream is stored before its final
event goes out.

The provider's reasoning (`reasoning_content`) becomes a `reasoning` item
whose text sits where the `reasoning` setting says: `summary` (summary_text
parts and `response.reasoning_summary_*` events, which the Agents SDK,
LangChain and the Vercel AI SDK all read), `text` (reasoning_text content and
`response.reasoning_text.*`, the spec's place for raw chain of thought) or
`both`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Literal

import orjson
import structlog
from aiohttp import web
from pydantic import Field

from proxy.core.call import RESPONSES, Call, Next, Reply, SSEEvent
from proxy.core.errors import ApiError, StoreUnavailable, invalid_request, not_found
from proxy.core.params import query_limit
from proxy.core.pipeline import Unit, UnitSettings
from proxy.core.streams import EventStream

from middleware.responses import mcp
from middleware.responses.request import item_not_found, referenced_ids, to_chat
from proxy.core.ids import new_id
from middleware.responses.store import ResponseStore
from middleware.responses.stream import StreamTranslator, assistant_messages, complete, skeleton
from proxy.core.chat_deltas import not_a_completion

log = structlog.get_logger("sovereign")

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway

_JSON = {"Content-Type": "application/json"}


class ResponsesUnit(Unit):
    """Maps the Responses API onto the chat-completions pipeline."""

    name = "responses"

    class Settings(UnitSettings):
        store_ttl_seconds: int = Field(30 * 86400, gt=0, description="How long stored responses are kept.")
        reasoning: Literal["summary", "text", "both"] = Field(
            "summary",
            description="Where the provider's reasoning goes in `reasoning` items and events: `summary` "
            "(summary_text parts, `response.reasoning_summary_*` events: what the Agents SDK, LangChain and the "
            "Vercel AI SDK read), `text` (reasoning_text content, `response.reasoning_text.*` events) or `both`.",
        )

    settings: Settings

    def __init__(self, settings: Settings, gateway: Gateway) -> None:
        super().__init__(settings, gateway)
        self.responses = ResponseStore(gateway.store, settings.store_ttl_seconds)

    async def __call__(self, call: Call, next: Next) -> Reply:
        if call.endpoint != RESPONSES:
            return await next(call)
        body = call.body
        tenant = call.principal.tenant
        history = await self._history(tenant, body.get("previous_response_id"))
        references = await self._references(tenant, body.get("input"))
        chat, conversation, input_items, tools = to_chat(body, history, references)
        store = body.get("store") is not False
        response = skeleton(body, new_id("resp_"), body.get("model"), tools, store)
        call.replace_body(chat)
        reply = await next(call)
        if reply.status >= 400:
            return reply  # the provider's OpenAI-shaped error, unchanged
        if reply.events is not None:
            reply.events = EventStream(
                reply.events, transform=lambda events: self._translate(events, response, tenant, conversation, input_items)
            )
            return reply
        completion = reply.json()
        if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
            raise not_a_completion(completion)
        complete(response, completion, self.settings.reasoning)
        mcp.add_items(response, call.agent)  # agent models: the MCP tool calls they ran
        raw = orjson.dumps(response)  # once, for the record and the reply
        if store:
            await self._store(tenant, response, raw, input_items, [*conversation, *assistant_messages(response["output"])])
        reply.set_json(response, raw)
        return reply

    async def _history(self, tenant: str, previous: Any) -> list[dict[str, Any]]:
        if previous is None:
            return []
        messages = await self.responses.messages(tenant, previous) if isinstance(previous, str) else None
        if messages is None:
            raise ApiError(400, f"Previous response with id '{str(previous)[:128]}' not found.",
                           code="previous_response_not_found", param="previous_response_id")
        return messages

    async def _references(self, tenant: str, value: Any) -> dict[str, dict[str, Any]]:
        """The stored items that `item_reference` inputs name; the first unknown id is a 400 naming it."""
        wanted = referenced_ids(value)
        if not wanted:
            return {}
        found = await self.responses.items(tenant, [item_id for _, item_id in wanted])
        for param, item_id in wanted:
            if item_id not in found:
                raise item_not_found(item_id, param)
        return found

    async def _translate(
        self,
        events: AsyncIterator[SSEEvent],
        response: dict[str, Any],
        tenant: str,
        conversation: list[dict[str, Any]],
        input_items: list[dict[str, Any]],
    ) -> AsyncIterator[SSEEvent]:
        translator = StreamTranslator(response, self.settings.reasoning)
        # Everything, the opening events included, inside aclosing: a client that
        # leaves at any yield must close the chat stream (provider, metering) too.
        async with contextlib.aclosing(events) as inner:  # type: ignore[type-var]  # Reply.events is typed AsyncIterator; every stream is an async generator or has aclose
            for event in translator.start():
                yield event
            try:
                async for chunk_event in inner:
                    chunk = chunk_event.json()
                    if isinstance(chunk, dict):
                        marker = chunk.get(mcp.MARKER)  # an agent model's MCP tool call
                        for event in translator.chunk(chunk) if marker is None else mcp.stream_events(translator, marker):
                            yield event
                    elif chunk_event.is_done:
                        translator.saw_done = True
                ending: Iterable[SSEEvent] = translator.finish()
            except ApiError as error:
                ending = translator.fail(error)
        ending = list(ending)
        if response["store"]:
            # Stored before the final event goes out: a client that chains on the
            # id as soon as it sees `response.completed` finds it.
            messages = [*conversation, *assistant_messages(response["output"])]
            await self._store(tenant, response, orjson.dumps(response), input_items, messages)
        for event in ending:
            yield event

    async def _store(self, tenant: str, response: dict[str, Any], raw: bytes, input_items: list[dict[str, Any]],
                     messages: list[dict[str, Any]]) -> None:
        """Keep a finished response (`raw`: its JSON); a store failure loses the record, never the reply already paid for."""
        try:
            await self.responses.put(tenant, response, raw, input_items, messages)
        except StoreUnavailable as exc:
            self.gateway.metrics.store_errors.inc()
            log.error("responses.store_failed", response_id=response.get("id"), tenant=tenant, error=repr(exc))

    # -- stored responses ------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/responses/{id}", self._get),
            web.delete("/v1/responses/{id}", self._delete),
            web.get("/v1/responses/{id}/input_items", self._input_items),
        ]

    async def _field(self, request: web.Request, name: str) -> str:
        principal = await self.gateway.principal(request.headers)
        raw = await self.responses.field(principal.tenant, request.match_info["id"], name)
        if raw is None:
            raise not_found("response")
        return raw

    async def _get(self, request: web.Request) -> web.Response:
        return web.Response(body=(await self._field(request, "response")).encode(), headers=_JSON)

    async def _delete(self, request: web.Request) -> web.Response:
        principal = await self.gateway.principal(request.headers)
        response_id = request.match_info["id"]
        if not await self.responses.delete(principal.tenant, response_id):
            raise not_found("response")
        return web.Response(body=orjson.dumps({"id": response_id, "object": "response", "deleted": True}),
                            headers=_JSON)

    async def _input_items(self, request: web.Request) -> web.Response:
        """OpenAI's list shape; `order` (default desc), `after` and `limit` (1-100, default 20)."""
        query = request.query
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid_request("`order` is asc or desc.", param="order")
        limit = query_limit(query, 20, 100)
        items = orjson.loads(await self._field(request, "input_items"))
        if order == "desc":
            items.reverse()
        after = query.get("after")
        if after is not None:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        listing = {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
        return web.Response(body=orjson.dumps(listing), headers=_JSON)


