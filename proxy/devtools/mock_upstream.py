"""Simulated OpenAI chat-completions (and embeddings) provider.

Used by the gateway's tests, ``sovereign demo``, benchmarks and offline development.
Replies are deterministic (same request -> same bytes except ``id``/``created``) and
follow the OpenAI wire format for ``chat.completion`` and ``chat.completion.chunk``.
Behaviour (chunk count, pacing, failures, broken streams, usage) is set server-wide by
:class:`MockOptions` and can be overridden per request with ``x-mock-*`` headers.

It behaves like a model that uses tools and then answers: offered tools, it calls them
(ids derived from the request, so unique per call and still deterministic); once the
conversation ends in tool results (``tool`` messages after the last user turn), it
answers in text that quotes them. The output cap (``max_completion_tokens`` /
``max_tokens``) bounds content and tool calls alike (``finish_reason: "length"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import base64
import dataclasses
import hashlib
import itertools
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.core.loop import run

MODEL_LIST = {
    "object": "list",
    "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "sovereign-mock"}],
}
# Header name -> (MockOptions field, parser) for per-request overrides.
_OVERRIDES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "x-mock-chunks": ("chunks", int),
    "x-mock-delay-ms": ("delay_ms", float),
    "x-mock-first-byte-delay-ms": ("first_byte_delay_ms", float),
    "x-mock-reasoning-chunks": ("reasoning_chunks", int),
    "x-mock-fail-status": ("fail_status", int),
    "x-mock-cut-after": ("cut_after", int),
    "x-mock-error-after": ("error_after", int),
    "x-mock-refuse": ("refuse", str),
}
_SCHEMA_SAMPLES: dict[str | None, Any] = {"string": "value", "integer": 1, "number": 1, "boolean": True}
_MAX_TOOL_CALLS = 3


@dataclass
class MockOptions:
    """Server-wide defaults; every field can be overridden per request by a header."""

    chunks: int = 8
    delay_ms: float = 0.0
    first_byte_delay_ms: float = 0.0
    reasoning_chunks: int = 0
    fail_status: int = 0
    cut_after: int = -1
    error_after: int = -1  # an in-band `data: {"error": …}` event after this many content chunks, as vLLM sends
    refuse: str = ""  # decline with this text: `refusal` instead of content, as OpenAI's structured outputs do
    report_usage: bool = True
    api_key: str | None = None


@dataclass(slots=True)
class _Reply:
    """What one choice of a reply contains; every choice of a request is identical."""

    reasoning: list[str]
    content: list[str]  # one entry per content chunk ("token"); empty for tool calls
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    # Per tool call, the argument fragments it streams (they join to its arguments).
    tool_fragments: list[list[str]] = dataclasses.field(default_factory=list)
    refused: bool = False  # the content chunks are a refusal

    @property
    def completion_tokens(self) -> int:
        """Tokens per choice: one per streamed reasoning/content/tool-call chunk."""
        return len(self.reasoning) + len(self.content) + sum(1 + len(f) for f in self.tool_fragments)

    def deltas(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """Stream deltas in order, each flagged True when it counts toward ``cut_after``."""
        yield {"role": "assistant", "content": None if self.tool_calls else ""}, False
        for text in self.reasoning:
            yield {"reasoning_content": text}, False
        for text in self.content:
            yield {"refusal" if self.refused else "content": text}, True
        for k, (call, fragments) in enumerate(zip(self.tool_calls, self.tool_fragments, strict=True)):
            fn = call["function"]
            head = {"index": k, "id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
            yield {"tool_calls": [head]}, True
            for part in fragments:
                yield {"tool_calls": [{"index": k, "function": {"arguments": part}}]}, True


def _token_logprobs(token: str, top: int) -> dict[str, Any]:
    """One content chunk's entry in `logprobs.content` (fixed values: the shape is what matters)."""
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    alternatives = [entry(token, -0.25)] + [entry(f"alt{k}", -2.0 - k) for k in range(1, top)]
    return {**entry(token, -0.25), "top_logprobs": alternatives[:top]}


def _fragments(arguments: str) -> list[str]:
    """Split a JSON arguments string into 2-3 pieces, as OpenAI streams them."""
    step = max(1, -(-len(arguments) // 3))
    return [arguments[i : i + step] for i in range(0, len(arguments), step)]


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _validate(body: Any) -> web.Response | None:
    """Return a 400 response if the body is not a usable chat-completions request."""
    if not isinstance(body, dict):
        return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    if not isinstance(body.get("model"), str):
        return _error(400, "Missing required parameter: 'model'.", "invalid_request_error", "model", "missing_required_parameter")
    if not isinstance(body.get("messages"), list):
        return _error(400, "Missing required parameter: 'messages'.", "invalid_request_error", "messages", "missing_required_parameter")
    for name in ("n", "max_tokens", "max_completion_tokens"):
        value = body.get(name)
        minimum = 1 if name == "n" else 0
        if value is not None and (type(value) is not int or value < minimum):
            return _error(400, f"Invalid value for '{name}'.", "invalid_request_error", name, "invalid_value")
    return None


def _last_user_words(messages: list[Any]) -> list[str]:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            return content.split() if isinstance(content, str) else []
    return []


def _tool_results(messages: list[Any]) -> list[str] | None:
    """``name returned result`` for each tool result the conversation ends with, else None.

    The conversation ends in tool results when a ``tool`` message comes after the last
    user message; the names come from the assistant tool calls they answer.
    """
    results: list[dict[str, Any]] = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") == "user":
            break
        if message.get("role") == "tool":
            results.append(message)
    if not results:
        return None
    names = {
        call.get("id"): (call.get("function") or {}).get("name")
        for message in messages
        if isinstance(message, dict) and message.get("role") == "assistant"
        for call in message.get("tool_calls") or ()
        if isinstance(call, dict)
    }
    answers = []
    for message in reversed(results):
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        name = names.get(message.get("tool_call_id")) or "the tool"
        answers.append(f"{name} returned {content if isinstance(content, str) else orjson.dumps(content).decode()}")
    return answers


def _call_id(body: dict[str, Any], index: int, name: str) -> str:
    """A tool-call id unique to this conversation turn and call, the same for the same request."""
    digest = hashlib.sha256(orjson.dumps([body.get("messages"), index, name], default=str)).hexdigest()
    return f"call_{digest[:24]}"


def _tool_calls(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Deterministic tool calls for the offered tools, honouring tool_choice/parallel_tool_calls.

    None once the conversation ends in tool results, unless tool_choice forces a call.
    """
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return []
    forced = choice == "required" or isinstance(choice, dict)
    if not forced and _tool_results(body["messages"]) is not None:
        return []
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        functions = [f for f in functions if f["name"] == name][:1] or [{"name": name}]
    else:
        functions = functions[: 1 if body.get("parallel_tool_calls") is False else _MAX_TOOL_CALLS]
    calls = []
    for k, fn in enumerate(functions):
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        args = {key: _SCHEMA_SAMPLES.get(s.get("type") if isinstance(s, dict) else None) for key, s in (props or {}).items()}
        arguments = orjson.dumps(args).decode()
        calls.append({"id": _call_id(body, k, fn["name"]), "type": "function",
                      "function": {"name": fn["name"], "arguments": arguments}})
    return calls


def _capped_tool_calls(calls: list[dict[str, Any]], cap: int | None) -> tuple[list[dict[str, Any]], list[list[str]], bool]:
    """The calls that fit in `cap` tokens, their argument fragments, and whether any was cut.

    A call's name is one token and each argument fragment one; a call cut inside its
    arguments keeps the fragments that fit, as a provider does.
    """
    kept: list[dict[str, Any]] = []
    kept_fragments: list[list[str]] = []
    budget = cap
    for call in calls:
        fragments = _fragments(call["function"]["arguments"])
        if budget is not None and budget < 1 + len(fragments):
            if budget >= 1:
                fragments = fragments[: budget - 1]
                kept.append({**call, "function": {**call["function"], "arguments": "".join(fragments)}})
                kept_fragments.append(fragments)
            return kept, kept_fragments, True
        kept.append(call)
        kept_fragments.append(fragments)
        if budget is not None:
            budget -= 1 + len(fragments)
    return kept, kept_fragments, False


def _prompt_tokens(messages: list[Any]) -> int:
    total = sum(len(orjson.dumps(m.get("content"))) // 4 + 4 for m in messages if isinstance(m, dict))
    return max(1, total)


EMBEDDING_DIMENSIONS = 8  # default vector length of the simulated embeddings


def embedding(item: Any, dimensions: int) -> list[float]:
    """A deterministic unit-free vector for one input (text or token array): floats in [-1, 1)."""
    seed = orjson.dumps(item)
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        values.extend(int.from_bytes(digest[i : i + 2], "little") / 32768 - 1 for i in range(0, len(digest), 2))
        counter += 1
    # Rounded through float32, so the base64 encoding decodes to exactly these floats.
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *values[:dimensions])))


def _embedding_inputs(value: Any) -> list[Any] | None:
    """The inputs of an embeddings request as a list (text or token arrays), or None when malformed."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(type(v) is int for v in value):
            return [value]
        if all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value):
            return value
    return None


def _embedding_tokens(item: Any) -> int:
    return len(item) if isinstance(item, list) else max(1, len(item) // 4)


class MockUpstream:
    """In-process fake provider that records requests and counts stream outcomes."""

    max_recorded = 10_000  # oldest recorded requests are dropped beyond this (long benchmarks)

    def __init__(self, options: MockOptions | None = None) -> None:
        self.options = options or MockOptions()
        self.requests: list[dict[str, Any]] = []
        self.stats: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.reset()

    def reset(self) -> None:
        """Forget recorded requests and zero the counters."""
        self.requests.clear()
        self.stats.update(requests=0, streams_started=0, streams_completed=0, client_disconnects=0)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_mock/requests", self._recorded)
        app.router.add_get("/_mock/stats", self._stats)
        app.router.add_post("/_mock/reset", self._reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on a real socket and return the base URL (``http://host:port/v1``)."""
        # handler_cancellation makes a client disconnect cancel the handler, so it is observed.
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_port = self._runner.addresses[0][1]
        return f"http://{f'[{host}]' if ':' in host else host}:{bound_port}/v1"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _recorded(self, _: web.Request) -> web.Response:
        return _json(self.requests)

    async def _stats(self, _: web.Request) -> web.Response:
        return _json(self.stats)

    async def _reset(self, _: web.Request) -> web.Response:
        self.reset()
        return _json({"reset": True})

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append({"path": request.path, "headers": headers, "body": body})
        if len(self.requests) > self.max_recorded:
            del self.requests[0]
        self.stats["requests"] += 1
        return body

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        key = self.options.api_key
        if key is None or request.headers.get("Authorization") == f"Bearer {key}":
            return None
        return _error(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return self._unauthorized(request) or _json(MODEL_LIST)

    def _request_options(self, request: web.Request) -> MockOptions:
        """Server options with any ``x-mock-*`` header overrides applied (ValueError if malformed)."""
        headers = request.headers
        changes = {field: parse(headers[name]) for name, (field, parse) in _OVERRIDES.items() if name in headers}
        if "x-mock-no-usage" in headers:
            changes["report_usage"] = False
        return dataclasses.replace(self.options, **changes) if changes else self.options

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        try:
            opts = self._request_options(request)
        except ValueError as exc:
            return _error(400, f"Bad x-mock header: {exc}", "invalid_request_error")
        if opts.first_byte_delay_ms > 0:
            await asyncio.sleep(opts.first_byte_delay_ms / 1000)
        echo = f"[auth: {request.headers.get('Authorization', '')}] " if "x-mock-echo-auth" in request.headers else ""
        if denied := self._unauthorized(request):
            return denied
        if opts.fail_status:
            kind = "invalid_request_error" if opts.fail_status < 500 else "server_error"
            return _error(opts.fail_status, f"mock failure {echo}".rstrip(), kind, None, "mock_failure")
        if invalid := _validate(body):
            return invalid

        cap = body.get("max_completion_tokens")
        cap = body.get("max_tokens") if cap is None else cap
        tool_calls = _tool_calls(body)
        content: list[str] = []
        fragments: list[list[str]] = []
        finish = "tool_calls" if tool_calls else "stop"
        if tool_calls:
            tool_calls, fragments, cut = _capped_tool_calls(tool_calls, cap)
            if cut:
                finish = "length"
        else:
            results = _tool_results(body["messages"])
            if results is not None:
                # An answer that uses the results: their words, one chunk each.
                content = [f"{word} " for word in " ".join(["Done:", "; ".join(results)]).split()]
            else:
                words = _last_user_words(body["messages"])
                content = [f"{words[i % len(words)]} " if words else f"w{i} " for i in range(opts.chunks)]
            if cap is not None and cap < len(content):
                content, finish = content[:cap], "length"
            if echo:  # prefix rather than insert, so the chunk count stays as configured
                content[:1] = [echo + (content[0] if content else "")]
        if opts.refuse and not tool_calls:
            content = [f"{word} " for word in opts.refuse.split()]
        reply = _Reply(["think "] * opts.reasoning_chunks, content, tool_calls, finish, fragments, bool(opts.refuse))

        n = body.get("n") or 1
        usage = None
        if opts.report_usage:
            prompt, completion = _prompt_tokens(body["messages"]), reply.completion_tokens * n
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": len(reply.reasoning) * n},
            }
        head = {
            "id": f"chatcmpl-mock-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_mock",
        }
        # Asked for (`logprobs: true`): one entry per content chunk, `top_logprobs` alternatives each.
        want_logprobs = body.get("logprobs") is True and not reply.refused
        top = body.get("top_logprobs") if type(body.get("top_logprobs")) is int else 0
        if body.get("stream") is True:
            stream_options = body.get("stream_options")
            include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
            return await self._stream(request, opts, reply, head, n, usage if include_usage else None, top if want_logprobs else None)

        text = None if tool_calls else "".join(content)
        message: dict[str, Any] = {"role": "assistant", "content": None if reply.refused else text,
                                   "refusal": text if reply.refused else None}
        if reply.reasoning:
            message["reasoning_content"] = "".join(reply.reasoning)
        if tool_calls:
            message["tool_calls"] = tool_calls
        logprobs = {"content": [_token_logprobs(text, top) for text in content], "refusal": None} if want_logprobs else None
        choice = {"message": message, "logprobs": logprobs, "finish_reason": finish}
        head["choices"] = [{"index": i, **choice} for i in range(n)]
        if usage is not None:
            head["usage"] = usage
        return _json(head)

    async def _embeddings(self, request: web.Request) -> web.Response:
        """Deterministic vectors (`dimensions`, default 8) as floats or base64 float32; usage counts input tokens."""
        body = await self._record(request)
        try:
            opts = self._request_options(request)
        except ValueError as exc:
            return _error(400, f"Bad x-mock header: {exc}", "invalid_request_error")
        if denied := self._unauthorized(request):
            return denied
        if opts.fail_status:
            kind = "invalid_request_error" if opts.fail_status < 500 else "server_error"
            return _error(opts.fail_status, "mock failure", kind, None, "mock_failure")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "Missing required parameter: 'model'.", "invalid_request_error", "model", "missing_required_parameter")
        inputs = _embedding_inputs(body.get("input"))
        if inputs is None:
            return _error(400, "Invalid value for 'input'.", "invalid_request_error", "input", "invalid_value")
        dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
        if type(dimensions) is not int or not 1 <= dimensions <= 4096:
            return _error(400, "Invalid value for 'dimensions'.", "invalid_request_error", "dimensions", "invalid_value")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector: Any = embedding(item, dimensions)
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        reply: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if opts.report_usage:
            tokens = sum(_embedding_tokens(item) for item in inputs)
            reply["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json(reply)

    async def _stream(
        self,
        request: web.Request,
        opts: MockOptions,
        reply: _Reply,
        head: dict[str, Any],
        n: int,
        usage: dict[str, Any] | None,
        top_logprobs: int | None = None,
    ) -> web.StreamResponse:
        """Send the reply as SSE, honouring delay/cut_after/error_after, and count disconnects."""
        head["object"], head["choices"] = "chat.completion.chunk", []
        if usage is not None:
            head["usage"] = None  # OpenAI marks every chunk before the usage chunk this way
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        delay = opts.delay_ms / 1000
        # The final empty delta carries finish_reason; flagged as content so that a cut_after
        # equal to the content length still aborts before it.
        steps = itertools.chain(reply.deltas(), [({}, True)])
        sent_content = 0
        try:
            await resp.prepare(request)
            self.stats["streams_started"] += 1
            for step, (delta, is_content) in enumerate(steps):
                if step and delay > 0:
                    await asyncio.sleep(delay)
                if is_content and 0 <= opts.cut_after <= sent_content:
                    if (transport := request.transport) is not None:
                        transport.abort()  # abrupt close: no terminating chunk, no [DONE]
                    return resp
                if is_content and 0 <= opts.error_after <= sent_content:
                    # A provider that fails mid-generation (vLLM, OpenRouter): an error event, then a clean end.
                    error = {"error": {"message": "The model failed mid-stream.", "type": "server_error", "code": "internal_error"}}
                    await resp.write(b"data: " + orjson.dumps(error) + b"\n\n")
                    return resp
                sent_content += is_content
                finish = None if delta else reply.finish_reason  # only the final delta is empty
                text = delta.get("content")
                logprobs = (
                    {"content": [_token_logprobs(text, top_logprobs)]} if top_logprobs is not None and isinstance(text, str) and text else None
                )
                for i in range(n):
                    head["choices"] = [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
                    await resp.write(b"data: " + orjson.dumps(head) + b"\n\n")
            if usage is not None:
                if delay > 0:
                    await asyncio.sleep(delay)
                head["choices"], head["usage"] = [], usage
                await resp.write(b"data: " + orjson.dumps(head) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            self.stats["streams_completed"] += 1
        except ConnectionResetError:
            # aiohttp already handles the dead connection; returning avoids a logged 500.
            self.stats["client_disconnects"] += 1
        except asyncio.CancelledError:
            self.stats["client_disconnects"] += 1
            raise
        return resp


def run_mock_upstream(host: str, port: int, options: MockOptions) -> None:
    """Serve the mock until interrupted (blocking); uses uvloop when installed."""

    async def serve() -> None:
        mock = MockUpstream(options)
        try:
            url = await mock.start(host, port)
        except OSError as exc:
            from proxy.web.server import cannot_listen

            await mock.close()
            raise cannot_listen(exc, host, port, "choose another with --port") from None
        print(f"mock upstream listening on {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await mock.close()

    with contextlib.suppress(KeyboardInterrupt):
        run(serve())


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``sovereign mock-upstream`` options to ``parser``."""
    d = MockOptions()
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9100, help="port to bind (default: %(default)s)")
    parser.add_argument("--chunks", type=int, default=d.chunks, help="content chunks per reply (default: %(default)s)")
    parser.add_argument("--delay-ms", type=float, default=d.delay_ms, help="pause between streamed chunks")
    parser.add_argument("--first-byte-delay-ms", type=float, default=d.first_byte_delay_ms, help="pause before response headers")
    parser.add_argument("--reasoning-chunks", type=int, default=d.reasoning_chunks, help="reasoning_content chunks before the content")
    parser.add_argument("--fail-status", type=int, default=d.fail_status, help="answer every completion with this HTTP status")
    parser.add_argument("--cut-after", type=int, default=d.cut_after, help="abort streams after this many content chunks")
    parser.add_argument("--error-after", type=int, default=d.error_after, help="end streams with an error event after this many content chunks")
    parser.add_argument("--no-usage", action="store_true", help="never report usage")
    parser.add_argument("--api-key", default=d.api_key, help="require 'Authorization: Bearer <key>'")


def options_from_args(args: argparse.Namespace) -> MockOptions:
    return MockOptions(
        chunks=args.chunks,
        delay_ms=args.delay_ms,
        first_byte_delay_ms=args.first_byte_delay_ms,
        reasoning_chunks=args.reasoning_chunks,
        fail_status=args.fail_status,
        cut_after=args.cut_after,
        error_after=args.error_after,
        report_usage=not args.no_usage,
        api_key=args.api_key,
    )
