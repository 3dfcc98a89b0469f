"""Server-side chat sessions keyed by the ``X-Session-ID`` request header.

Chat completions only. With ``X-Session-ID: <id>`` (1-128 characters of
``[A-Za-z0-9._:-]``, else 400) the session's stored history goes in front of the
request's messages, and when the reply completes successfully the new turn (the
request's non-system messages plus the assistant's message: text and tool calls,
assembled from the stream when streaming) is appended atomically. Nothing is
stored for an error reply, a stream that breaks or ends without a finish reason,
or a client that disconnects. The id is echoed in the ``X-Session-ID`` response
header; without the header, ``auto_create`` (off by default) opens a new
``sess_…`` session.

System messages: the request's leading system/developer messages, when present,
go first for this request and the last of them becomes the session's stored
system message (the latest request that sends one wins); otherwise the stored
system message goes first. System messages later in the request stay in place
and are not stored. The stored system message is never trimmed; the oldest whole
turns are (``max_messages``, ``max_tokens``), never the newest turn. Reasoning
text is not stored (providers refuse it as input); with ``n > 1`` the first
choice is stored. The prepended history is part of the prompt, so it is metered
as input tokens like any other.

After a session's first stored turn a background task asks the provider for a
short title, through the rest of the pipeline (so it is metered and marked
``ledger_kind = "title"``); it never delays or fails the user's request.

Routes: ``GET /v1/sessions``, ``GET``/``DELETE /v1/sessions/{id}``, all scoped to
the caller's tenant (another tenant's session is 404 ``not_found``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import string
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import Field

from proxy.core.call import CHAT, Call, Next, Reply, SSEEvent
from proxy.core.chat_deltas import ChoiceDelta, ToolCall, ToolCalls
from proxy.core.errors import ApiError, StoreUnavailable, invalid_request, not_found
from proxy.web.middlewares import new_request_id
from proxy.core.params import query_limit
from proxy.core.pipeline import Unit, UnitSettings
from proxy.core.streams import EventStream
from proxy.core.settings import ConfigError

from middleware.sessions.store import SessionStore

log = structlog.get_logger("sovereign")

HEADER = "X-Session-ID"
SESSION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
SYSTEM_ROLES = frozenset({"system", "developer"})
_ALPHABET = string.ascii_letters + string.digits
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
TITLE_TRANSCRIPT_CHARS = 2000  # of the first turn, sent to the title model
TITLE_MAX_CHARS = 80
TITLE_RETRY_PAUSE = 0.5

DEFAULT_TITLE_PROMPT = (
    "Write a short title (at most six words) for the conversation below. "
    "Answer with the title only: no quotes, no trailing punctuation."
)


def new_session_id() -> str:
    return "sess_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class SessionsUnit(Unit):
    name = "sessions"

    class Settings(UnitSettings):
        auto_create: bool = Field(
            False, description="Open a new session (returned in X-Session-ID) for chat requests without the header."
        )
        ttl_seconds: int = Field(7 * 86400, ge=1, description="A session expires this long after its last turn.")
        max_messages: int = Field(200, ge=2, description="Most stored messages per session (oldest turns trimmed).")
        max_tokens: int = Field(32000, ge=1, description="Most estimated tokens per session history (oldest turns trimmed).")
        titles: bool = Field(True, description="Ask the provider for a title after a session's first reply.")
        title_model: str | None = Field(None, description="Public model for titles (default: the request's model).")
        title_prompt: str = Field(DEFAULT_TITLE_PROMPT, min_length=1, description="System prompt of the title request.")
        title_max_tokens: int = Field(24, ge=1, le=1024, description="Output cap of the title request.")

    settings: Settings

    def __init__(self, settings: Settings, gateway: Any) -> None:
        super().__init__(settings, gateway)
        title_model = settings.title_model
        if title_model is not None and title_model not in gateway.settings.models:
            raise ConfigError(f"invalid configuration:\n  units.sessions.title_model: no model named `{title_model}`")
        self.sessions = SessionStore(gateway.store, settings.ttl_seconds, settings.max_messages, settings.max_tokens)

    # -- the pipeline step ---------------------------------------------------
    async def __call__(self, call: Call, next: Next) -> Reply:
        if call.endpoint != CHAT:
            return await next(call)
        session_id = call.headers.get(HEADER)
        fresh = session_id is None
        if session_id is None:
            if not self.settings.auto_create:
                return await next(call)
            session_id = new_session_id()
        elif not SESSION_ID.fullmatch(session_id):
            raise invalid_request(
                f"{HEADER} must be 1-128 characters of letters, digits, '.', '_', ':' or '-'.", param=HEADER
            )
        messages = call.body.get("messages")
        if not isinstance(messages, list):
            return await next(call)  # not a chat request the provider will accept; it says so

        tenant = call.principal.tenant
        stored_system: dict[str, Any] | None = None
        history: list[dict[str, Any]] = []
        read_created_at = ""  # the session as this turn found it ("": new)
        if not fresh:
            meta, history = await self.sessions.load(tenant, session_id)
            read_created_at = meta.get("created_at", "")
            if meta.get("system"):
                stored_system = orjson.loads(meta["system"])
        lead = 0
        while lead < len(messages) and _is_system(messages[lead]):
            lead += 1
        new_system = messages[lead - 1] if lead else None  # the last leading one is stored
        if history or (stored_system and not lead):  # else the body stays as sent (no re-serialising)
            head = messages[:lead] if lead else ([stored_system] if stored_system else [])
            call.replace_body({**call.body, "messages": [*head, *history, *messages[lead:]]})
        turn = [m for m in messages[lead:] if isinstance(m, dict) and not _is_system(m)]

        call.session_id = session_id
        call.response_headers[HEADER] = session_id
        context = _TurnContext(self, call, session_id, new_system, turn, read_created_at)
        reply = await next(call)
        if reply.status >= 400:
            return reply
        if reply.events is None:
            assistant = _assistant_from_json(reply.json())
            if assistant is not None:
                try:
                    if not await context.save(assistant):
                        call.response_headers["X-Session-Saved"] = "false"
                except StoreUnavailable as exc:
                    # The reply exists and is paid for: deliver it, say the turn was not kept.
                    self.gateway.metrics.store_errors.inc()
                    log.error("session.save_failed", session_id=context.session_id, error=repr(exc))
                    call.response_headers["X-Session-Saved"] = "false"
        else:
            reply.events = EventStream(reply.events, transform=lambda events: self._relay(events, context))
        return reply

    async def _relay(self, events: AsyncIterator[SSEEvent], context: _TurnContext) -> AsyncIterator[SSEEvent]:
        """Pass events through untouched while assembling choice 0; save before `[DONE]`.

        Saving before `[DONE]` goes out means a client that sends its next turn as
        soon as it sees `[DONE]` finds this one stored.
        """
        builder = _StreamedMessage()
        saved = False
        async with contextlib.aclosing(events) as inner:  # type: ignore[type-var]  # Reply.events is typed AsyncIterator; every stream is an async generator or has aclose
            async for event in inner:
                if event.is_done:
                    if builder.finished and not saved:
                        saved = True
                        await self._save_in_stream(context, builder)
                else:
                    builder.feed(event.json())
                yield event
        if builder.finished and not saved:  # a provider that ends without [DONE]
            await self._save_in_stream(context, builder)

    @staticmethod
    async def _save_in_stream(context: _TurnContext, builder: _StreamedMessage) -> None:
        try:
            await context.save(builder.message())
        except StoreUnavailable:
            # The stream has started: tell the client in-band that the turn was not kept.
            context.unit.gateway.metrics.store_errors.inc()
            raise StoreUnavailable("The reply was produced but the session could not be saved.") from None

    # -- titles ----------------------------------------------------------------
    async def make_title(self, context: _TurnContext, turn: list[dict[str, Any]]) -> None:
        """Background: ask for a title (one retry), store it; failures are logged without prompt text."""
        settings = self.settings
        principal, session_id = context.call.principal, context.session_id
        tenant = principal.tenant
        body = {
            "model": settings.title_model or context.model,
            "messages": [
                {"role": "system", "content": settings.title_prompt},
                {"role": "user", "content": _transcript(turn)},
            ],
            "max_completion_tokens": settings.title_max_tokens,
            "stream": False,
        }
        for attempt in (1, 2):
            title_call = Call(CHAT, dict(body), None, _NO_HEADERS, new_request_id(), time.monotonic())
            title_call.principal = principal
            title_call.ledger_kind = "title"
            try:
                reply = await self.gateway.submit(title_call, after=self)
                title = _title_from_reply(reply)
                if title is None:
                    raise ValueError(f"no usable title in the reply (HTTP {reply.status})")
                await self.sessions.set_title(tenant, session_id, title, "done")
                return
            except Exception as exc:  # noqa: BLE001 - a title must never surface as an error
                error = exc.code if isinstance(exc, ApiError) else type(exc).__name__
                log.warning(
                    "session.title_failed", tenant=tenant, session_id=session_id, attempt=attempt, error=error,
                    request_id=title_call.request_id,
                )
            if attempt == 1:
                await asyncio.sleep(TITLE_RETRY_PAUSE)
        with contextlib.suppress(Exception):
            await self.sessions.set_title(tenant, session_id, "", "failed")

    # -- the session API --------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/sessions", self._list),
            web.get("/v1/sessions/{id}", self._get),
            web.delete("/v1/sessions/{id}", self._delete),
        ]

    async def _list(self, request: web.Request) -> web.Response:
        principal = await self.gateway.principal(request.headers)
        limit = query_limit(request.query, 20, 100)
        after = request.query.get("after")
        page = await self.sessions.page(principal.tenant, limit, after)
        if page is None:
            raise invalid_request("`after` is not the id of one of your sessions.", param="after")
        views, has_more = page
        data = [view.public() for view in views]
        return _json(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": has_more,
            }
        )

    async def _get(self, request: web.Request) -> web.Response:
        principal = await self.gateway.principal(request.headers)
        session_id = request.match_info["id"]
        view = await self.sessions.get(principal.tenant, session_id) if SESSION_ID.fullmatch(session_id) else None
        if view is None:
            raise not_found("session")
        return _json(view.public(with_messages=True))

    async def _delete(self, request: web.Request) -> web.Response:
        principal = await self.gateway.principal(request.headers)
        session_id = request.match_info["id"]
        if not SESSION_ID.fullmatch(session_id) or not await self.sessions.delete(principal.tenant, session_id):
            raise not_found("session")
        return _json({"id": session_id, "object": "session", "deleted": True})


class _TurnContext:
    """What saving one turn needs, captured before the call goes on (later units change the body)."""

    __slots__ = ("unit", "call", "model", "session_id", "system", "turn", "read_created_at")

    def __init__(
        self, unit: SessionsUnit, call: Call, session_id: str,
        system: dict[str, Any] | None, turn: list[dict[str, Any]], read_created_at: str,
    ) -> None:
        self.unit = unit
        self.call = call
        self.session_id = session_id
        self.system = system
        self.turn = turn
        self.read_created_at = read_created_at
        self.model = call.model  # the public name; the forwarder swaps in the provider's

    async def save(self, assistant: dict[str, Any]) -> bool:
        """Append the finished turn; False when its session was deleted (or expired) meanwhile."""
        unit = self.unit
        agent = self.call.agent  # an agent model's run: its tool traffic is stored only if configured
        turn = [*self.turn, *(agent.session_turn(assistant) if agent is not None else [assistant])]
        stored = await unit.sessions.append(
            self.call.principal.tenant, self.session_id, self.system, turn, self.read_created_at
        )
        if stored is None:
            # Deleted while this turn ran: bringing it back would undo the client's delete.
            log.info("session.gone", session_id=self.session_id, request_id=self.call.request_id)
            return False
        if stored[1] and unit.settings.titles:
            unit.gateway.spawn(unit.make_title(self, turn), "session title")
        return True


class _StreamedMessage:
    """Assembles choice 0 of a chat stream: content text and tool calls by index."""

    __slots__ = ("content", "tool_calls", "function_call", "finished")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.tool_calls = ToolCalls()
        # Legacy `function_call` deltas (the legacy_functions unit turns tool calls back into them).
        self.function_call: ToolCall | None = None
        self.finished = False

    def feed(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            part = ChoiceDelta(choice)
            if part.content is not None:
                self.content.append(part.content)
            if part.refusal:  # a refusal is the assistant's text of the turn (see _assistant_from_json)
                self.content.append(part.refusal)
            for fragment in part.tool_calls:
                self.tool_calls.add(fragment)
            if part.function_call is not None:
                if self.function_call is None:
                    self.function_call = ToolCall()
                self.function_call.add_function(part.function_call)
            if part.finish_reason:
                self.finished = True

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) if self.content else None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls.message_calls()
        if self.function_call is not None:
            message["function_call"] = self.function_call.function()
        return _replayable(message)


def _is_system(message: Any) -> bool:
    role = message.get("role") if isinstance(message, dict) else None
    return isinstance(role, str) and role in SYSTEM_ROLES


def _assistant_from_json(body: Any) -> dict[str, Any] | None:
    """The assistant message of choice 0 of a chat completion, as it is stored."""
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return None
    content, refusal = message.get("content"), message.get("refusal")
    # A refusal (structured outputs send it instead of content) is what the assistant said
    # that turn; kept as content, which every provider reads back.
    stored: dict[str, Any] = {"role": "assistant", "content": refusal if content is None and isinstance(refusal, str) else content}
    for field in ("tool_calls", "function_call"):
        if message.get(field):
            stored[field] = message[field]
    return _replayable(stored)


def _replayable(message: dict[str, Any]) -> dict[str, Any]:
    """Providers refuse an assistant message with neither content nor calls (e.g. a
    reasoning-only reply); stored as such it would break every later turn."""
    if message.get("content") is None and not message.get("tool_calls") and not message.get("function_call"):
        message["content"] = ""
    return message


def _transcript(turn: list[dict[str, Any]]) -> str:
    lines = []
    for message in turn:
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text ones
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if isinstance(content, str) and content:
            lines.append(f"{message.get('role', 'user')}: {content}")
    return "\n".join(lines)[:TITLE_TRANSCRIPT_CHARS]


def _title_from_reply(reply: Reply) -> str | None:
    if reply.status >= 400 or reply.events is not None:
        return None
    message = _assistant_from_json(reply.json())
    content = message.get("content") if message else None
    if not isinstance(content, str):
        return None
    line = next((part for part in content.strip().splitlines() if part.strip()), "")
    title = line.strip().strip("\"'“”‘’*#").strip().rstrip(".")
    return title[:TITLE_MAX_CHARS].rstrip() or None



def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")
