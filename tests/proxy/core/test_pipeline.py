"""The unit pipeline: registration by name, order, per-unit settings, start-up errors."""

from __future__ import annotations

import sys
import types

import pytest

from proxy.core.call import Reply
from proxy.core.gateway import Gateway
from proxy.core.pipeline import registered_units, Unit, UnitSettings
from proxy.core.settings import ConfigError
from tests.support import make_settings


class TagSettings(UnitSettings):
    tag: str


def _tag_unit(name: str) -> type[Unit]:
    class TagUnit(Unit):
        """Adds its tag to a header on the way in and to the reply on the way out."""

        Settings = TagSettings

        async def __call__(self, call, next):
            call.response_headers["X-Order"] = call.response_headers.get("X-Order", "") + self.settings.tag
            reply = await next(call)
            reply.headers["X-Unwound"] = reply.headers.get("X-Unwound", "") + self.settings.tag
            return reply

    TagUnit.name = name
    return TagUnit


@pytest.fixture
def tag_units(monkeypatch):
    module = types.ModuleType("tests_tag_units")
    module.First = _tag_unit("first")
    module.Second = _tag_unit("second")
    monkeypatch.setitem(sys.modules, "tests_tag_units", module)
    monkeypatch.setitem(registered_units(), "first", "tests_tag_units:First")
    monkeypatch.setitem(registered_units(), "second", "tests_tag_units:Second")


async def test_units_run_in_configured_order_and_unwind_in_reverse(mock, gateway_factory, tag_units):
    settings = make_settings(
        mock.url, admin_token=None, pipeline=["second", "first"], units={"first": {"tag": "A"}, "second": {"tag": "B"}}
    )
    gw = await gateway_factory(settings)
    raw = await gw.openai().chat.completions.with_raw_response.create(
        model="sovereign-alpha", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["X-Order"] == "BA"
    assert raw.headers["X-Unwound"] == "AB"


def test_unknown_unit_fails_at_start_up(mock, tag_units):
    with pytest.raises(ConfigError, match=r"pipeline\[1\]: no unit named `nope`"):
        Gateway(make_settings(mock.url, pipeline=["first", "nope"], units={"first": {"tag": "A"}}))


def test_bad_unit_settings_name_the_field(mock, tag_units):
    with pytest.raises(ConfigError, match=r"units\.first\.tag"):
        Gateway(make_settings(mock.url, pipeline=["first"], units={"first": {}}))
    with pytest.raises(ConfigError, match=r"units\.first\.extra"):
        Gateway(make_settings(mock.url, pipeline=["first"], units={"first": {"tag": "x", "extra": 1}}))


def test_settings_for_a_unit_outside_the_pipeline_are_refused(mock):
    with pytest.raises(ConfigError, match=r"units\.ghost: not in the pipeline"):
        Gateway(make_settings(mock.url, pipeline=[], units={"ghost": {}}))


async def test_reply_json_helpers():
    reply = Reply(body=b'{"a": 1}')
    assert reply.json() == {"a": 1}
    reply.set_json({"b": 2})
    assert reply.body_bytes() == b'{"b":2}'
