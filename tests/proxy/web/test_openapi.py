"""/openapi.json: in step with the router, its request bodies generated from the models, valid OpenAPI 3.1,
and honoured by the running gateway (schemathesis)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import aiohttp
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis import checks

from proxy.admin.bodies import OPENAPI_BODIES
from proxy.core.gateway import GATEWAY, Gateway
from proxy.core.settings import DEFAULT_PIPELINE, Settings
from proxy.web.app import create_app
from proxy.web.openapi import BODIES, document
from tests.support import ADMIN_TOKEN, REPO, free_port, make_settings, settings_data


def _routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, sub-apps included."""
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method in ("HEAD", "*") or path is None:
            continue
        found.add((route.method.lower(), re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)))
    for resource in app.router.resources():
        sub = getattr(resource, "_app", None)
        if sub is not None:  # a sub-app's resources already carry its prefix
            found |= _routes(sub)
    return found


def _normalised(paths: set[tuple[str, str]]) -> set[tuple[str, str]]:
    # Parameter names do not matter for coverage: /v1/models/{model} == /v1/models/{x}.
    return {(m, re.sub(r"\{\w+\}", "{}", p)) for m, p in paths}


def test_every_route_is_documented_and_every_documented_route_exists():
    app = create_app(make_settings("http://127.0.0.1:9/v1", pipeline=DEFAULT_PIPELINE))
    served = _normalised(_routes(app))
    documented = _normalised({(m, p) for p, ops in document(app[GATEWAY].units)["paths"].items() for m in ops})
    assert served == documented


async def _served_document(gw) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.base_url + "/openapi.json") as resp:
            assert resp.status == 200
            return await resp.json()


def _model_components(model) -> dict:
    """What pydantic says of `model`: its schema and its nested models', by component name."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs", {}), model.__name__: schema}


async def test_request_bodies_are_the_models_own_schemas(mock, gateway_factory):
    gw = await gateway_factory(make_settings(mock.url, pipeline=DEFAULT_PIPELINE))
    served = await _served_document(gw)
    validate(served)  # a valid OpenAPI 3.1 document, generated parts included
    models = {**OPENAPI_BODIES}
    for unit in gw.app[GATEWAY].units:
        models.update(unit.openapi_schemas())
    # Every documented body has a model here, the admin ones and those of chat, Responses, Messages, embeddings.
    assert set(models) == set(BODIES)
    components = served["components"]["schemas"]
    for model in models.values():
        for name, schema in _model_components(model).items():
            assert components[name] == schema, name
    for path, ops in served["paths"].items():
        for method, op in ops.items():
            if "requestBody" in op:
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.rpartition("/")[2] in models, (method, path)


async def test_credit_top_up_needs_no_idempotency_key(mock, gateway_factory):
    gw = await gateway_factory(make_settings(mock.url))
    top_up = (await _served_document(gw))["components"]["schemas"]["CreditTopUp"]
    assert top_up["required"] == ["amount"]
    assert "idempotency_key" in top_up["properties"]
    # What the document says is what the admin API does: a top-up without a key applies.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=admin) as session:
        async with session.post(gw.base_url + "/admin/tenants", json={"id": "acme"}) as resp:
            assert resp.status == 201
        async with session.post(gw.base_url + "/admin/tenants/acme/credits", json={"amount": 7}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["balance"] == 7


async def test_a_body_whose_unit_is_not_in_the_pipeline_is_a_plain_object(mock, gateway_factory):
    gw = await gateway_factory(make_settings(mock.url, pipeline=["auth"]))
    served = await _served_document(gw)
    validate(served)
    components = served["components"]["schemas"]
    for name in ("ChatCompletionRequest", "ResponsesRequest", "MessagesRequest", "EmbeddingsRequest"):
        assert components[name] == {"type": "object", "description": BODIES[name]}
    assert components["KeyCreate"] == _model_components(OPENAPI_BODIES["KeyCreate"])["KeyCreate"]


# -- schemathesis against a real `sovereign serve` -------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A simulated provider and a full-pipeline gateway as real processes, plus a funded key."""
    tmp = tmp_path_factory.mktemp("openapi")
    mock_port, port = free_port(), free_port()
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-m", "proxy", "mock-upstream", "--port", str(mock_port)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    data = _live_settings(f"http://127.0.0.1:{mock_port}/v1")
    data["server"] = {"host": "127.0.0.1", "port": port}
    config = tmp / "gw.yaml"
    config.write_text(yaml.safe_dump(data))
    procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)], cwd=REPO, env=env,
                                  stdout=open(tmp / "gw.log", "wb"), stderr=subprocess.STDOUT))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                requests.get(base + "/healthz", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        requests.post(base + "/admin/tenants", json={"id": "fuzz", "credits": 10**12}, headers=admin, timeout=5).raise_for_status()
        key = requests.post(base + "/admin/keys", json={"tenant": "fuzz"}, headers=admin, timeout=5).json()["key"]
        assert requests.get(base + "/openapi.json", timeout=5).json() == json.loads(json.dumps(LIVE_DOCUMENT))
        yield base, key
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def _live_settings(mock_url: str) -> dict:
    data = settings_data(mock_url)
    data["pipeline"] = DEFAULT_PIPELINE
    # An embedding model, so /v1/embeddings has something to serve.
    data["models"]["sovereign-embed"] = {"upstream": "default", "kind": "embeddings", "price": {"input_per_million": 1}}
    return data


FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"})
# The document of the full pipeline, request bodies generated from the real models; the `live` fixture
# checks that the running gateway serves exactly this one.
LIVE_DOCUMENT = document(Gateway(Settings.model_validate(_live_settings("http://127.0.0.1:9/v1"))).units)
schema = schemathesis.openapi.from_dict(LIVE_DOCUMENT)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_running_gateway_honours_its_openapi_document(case, live):
    base, key = live
    token = ADMIN_TOKEN if case.path.startswith("/admin") else key
    # Schemathesis may draw extra headers, once `content-length: c$M`: a message whose framing is
    # broken is refused by aiohttp's HTTP parser (400 text/plain) before the gateway sees it, and
    # no HTTP client lets its user set those headers; the framing stays the client library's.
    if case.headers:
        case.headers = {k: v for k, v in case.headers.items() if k.lower() not in FRAMING_HEADERS}
    case.call_and_validate(
        base_url=base,
        headers={"Authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"},
        checks=[checks.not_a_server_error, checks.response_schema_conformance, checks.content_type_conformance],
        timeout=10,
    )


@pytest.mark.parametrize(
    "admin, on_this_port",
    [({"token": None}, False), ({"token": ADMIN_TOKEN, "port": 1}, False), ({"token": ADMIN_TOKEN}, True)],
    ids=["admin-off", "admin-on-its-own-port", "admin-on-the-client-port"],
)
async def test_served_document_lists_admin_routes_only_where_they_are_served(mock, gateway_factory, admin, on_this_port):
    gw = await gateway_factory(make_settings(mock.url, admin=admin))
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.base_url + "/openapi.json") as resp:
            served = await resp.json()
    admin_paths = [path for path in served["paths"] if path.startswith("/admin")]
    assert bool(admin_paths) == on_this_port
    assert ("admin" in served["components"]["securitySchemes"]) == on_this_port
    # What the port serves and what its document says agree, admin included.
    routes = _normalised(_routes(gw.app))
    assert {p for p in routes if p[1].startswith("/admin")} == {
        p for p in _normalised({(m, p) for p, ops in served["paths"].items() for m in ops}) if p[1].startswith("/admin")
    }
