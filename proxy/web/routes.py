"""The core HTTP routes: the two pipeline endpoints, models, and probes."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from proxy.web import relay
from proxy.core.call import CHAT, EMBEDDINGS, MESSAGES, MESSAGES_COUNT_TOKENS, RESPONSES, Call
from proxy.core.errors import invalid_request, model_not_found
from proxy.core.gateway import GATEWAY, Gateway
from proxy.web.body import read_body
from proxy.web.middlewares import CALL, PUBLIC_MODEL, REQUEST_ID, STARTED

JSON_TYPES = ("application/json",)


async def read_json_body(request: web.Request, gateway: Gateway) -> tuple[bytes, dict[str, Any]]:
    """Read and parse the body once; every failure is an OpenAI-shaped 4xx."""
    content_type = request.headers.get("Content-Type")
    if content_type is not None and request.content_type not in JSON_TYPES:
        raise invalid_request("Content-Type must be application/json.", param=None, code="invalid_content_type")
    raw = await read_body(request, gateway)
    if not raw:
        raise invalid_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_request("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_value")
    return raw, body


def pipeline_endpoint(endpoint: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        gateway: Gateway = request.app[GATEWAY]
        gateway.in_flight += 1
        try:
            return await _serve(request, gateway)
        finally:
            gateway.in_flight -= 1

    async def _serve(request: web.Request, gateway: Gateway) -> web.StreamResponse:
        raw, body = await read_json_body(request, gateway)
        call = Call(endpoint, body, raw, request.headers, request[REQUEST_ID], request[STARTED])
        request[CALL] = call
        model = body.get("model")
        # Only configured names become metric labels: a label per arbitrary
        # client string would grow memory and /metrics without bound.
        if isinstance(model, str) and model in gateway.settings.models:
            request[PUBLIC_MODEL] = model
        reply = await gateway.handle(call)
        ttfb = gateway.metrics.child(gateway.metrics.ttfb, endpoint)

        def first_byte() -> None:
            ttfb.observe(time.monotonic() - call.started_at)

        if reply.events is None:
            first_byte()
            return await relay.send_json(reply, call)
        gateway.metrics.open_streams.inc()
        try:
            return await relay.send_stream(
                request, reply, call, gateway.settings.server.sse_keepalive_seconds, first_byte
            )
        finally:
            gateway.metrics.open_streams.dec()

    return handler


def _model_entry(name: str, owned_by: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by}


async def list_models(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    principal = await gateway.principal(request.headers)
    data = [
        _model_entry(name, entry.owned_by)
        for name, entry in gateway.settings.models.items()
        if principal.may_use(name)
    ]
    return web.json_response({"object": "list", "data": data}, dumps=_dumps)


async def get_model(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    principal = await gateway.principal(request.headers)
    name = request.match_info["model"]
    entry = gateway.settings.models.get(name)
    if entry is None or not principal.may_use(name):
        raise model_not_found(name)
    return web.json_response(_model_entry(name, entry.owned_by), dumps=_dumps)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    reasons = []
    if gateway.draining:
        reasons.append("draining")
    if not gateway.started:
        reasons.append("starting")
    elif not await gateway.store.ping():
        reasons.append("store_unreachable")
    # Listed but not failing readiness: settlements still pending, an unreachable tool server.
    degraded = [reason for unit in gateway.units for reason in unit.readiness()]
    if reasons:
        return web.json_response({"status": "unavailable", "reasons": reasons + degraded}, status=503)
    ready: dict[str, Any] = {"status": "ready", "store": "durable" if gateway.store.durable else "memory"}
    if degraded:
        ready["reasons"] = degraded
    return web.json_response(ready)


async def metrics(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    return web.Response(body=gateway.metrics.render(), headers={"Content-Type": gateway.metrics.content_type})


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def core_routes(gateway: Gateway) -> list[web.RouteDef]:
    routes = [
        web.post("/v1/chat/completions", pipeline_endpoint(CHAT)),
        web.post("/v1/responses", pipeline_endpoint(RESPONSES)),
        web.post("/v1/messages", pipeline_endpoint(MESSAGES)),
        web.post("/v1/messages/count_tokens", pipeline_endpoint(MESSAGES_COUNT_TOKENS)),
        web.post("/v1/embeddings", pipeline_endpoint(EMBEDDINGS)),
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model}", get_model),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]
    if gateway.settings.metrics.enabled:
        routes.append(web.get("/metrics", metrics))
    from proxy.web.openapi import openapi_json

    routes.append(web.get("/openapi.json", openapi_json))
    return routes


__all__ = ["core_routes", "read_json_body"]
