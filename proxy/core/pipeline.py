"""The unit pipeline: registration by name, per-unit settings, and chaining.

A unit is a class with a ``name``, a pydantic ``Settings`` model and a
``__call__(call, next)`` that returns an awaitable `Reply`: a coroutine
function, or a plain function that does its work and returns ``next(call)``
(see `Unit.__call__`). Every unit, built-in or third-party, is
registered by name under the entry-point group ``sovereign.middleware`` (the
built-ins in setup.cfg: that is their one list). The pipeline's order and each
unit's settings come from the config (the default order is
`proxy.core.settings.DEFAULT_PIPELINE`); unknown names and bad settings fail
at start-up with the field path (``units.metering.on_low_balance``).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web
from multidict import CIMultiDictProxy
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.core.call import Call, Next, Principal, Reply
from proxy.core.settings import ConfigError, format_validation_error

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway

ENTRY_POINT_GROUP = "sovereign.middleware"

Authenticator = Callable[[CIMultiDictProxy[str]], Awaitable[Principal]]
# (error, request id) -> (status, JSON body): how errors look on the routes of another protocol.
ErrorRenderer = Callable[[Any, str], tuple[int, bytes]]

_registry: dict[str, str] | None = None


def registered_units() -> dict[str, str]:
    """Unit name -> ``module:Class`` for every installed unit, read once from the entry points.

    The mapping is the live registry: code that embeds the gateway (and the
    tests) may add units to it before building one.
    """
    global _registry
    if _registry is None:
        _registry = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _registry


class UnitSettings(BaseModel):
    """Base of every unit's settings: unknown fields are configuration mistakes."""

    model_config = ConfigDict(extra="forbid")


class Unit:
    """Base class of pipeline units; subclasses override what they need."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[UnitSettings]] = UnitSettings

    def __init__(self, settings: UnitSettings, gateway: Gateway) -> None:
        self.settings = settings
        self.gateway = gateway

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        """Serve `call`, handing it on with `next(call)`; an exception is the client's error.

        Usually ``async def``. A unit that only checks or changes the call on
        its way in (auth, validation) may be a plain function that returns
        ``next(call)`` itself: it then adds no coroutine frame to the request,
        which every suspension of the request walks through. Either way the
        caller only awaits what it returns.
        """
        return next(call)

    def routes(self) -> list[web.RouteDef]:
        """Extra HTTP routes this unit serves (mounted at the root app)."""
        return []

    def authenticator(self) -> Authenticator | None:
        """The unit that authenticates keys provides it here; routes outside the pipeline use it."""
        return None

    def openapi_schemas(self) -> dict[str, type[BaseModel]]:
        """Component name -> the pydantic model of a request body this unit checks; /openapi.json generates them."""
        return {}

    def error_renderers(self) -> dict[str, ErrorRenderer]:
        """Path prefix -> renderer, for a unit that serves another protocol whose errors have their own shape."""
        return {}

    def request_id_headers(self) -> dict[str, str]:
        """Path prefix -> a header that also carries the request id there (the name another protocol's SDKs read)."""
        return {}

    async def startup(self) -> None:
        """Runs once the event loop and the store are up."""

    async def shutdown(self) -> None:
        """Runs at exit, after open requests have drained."""

    async def drain(self) -> None:
        """Write what the unit batches in memory now (`Gateway.drain` calls it before waiting for background work)."""

    def readiness(self) -> list[str]:
        """Conditions `/readyz` lists as reasons without failing readiness (pending settlements, an unreachable tool server)."""
        return []


def _import(target: str) -> type[Unit]:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def find_unit(name: str) -> type[Unit] | None:
    target = registered_units().get(name)
    return _import(target) if target is not None else None


def unit_classes(names: list[str]) -> list[type[Unit]]:
    classes = []
    for index, name in enumerate(names):
        cls = find_unit(name)
        if cls is None:
            raise ConfigError(f"invalid configuration:\n  pipeline[{index}]: no unit named `{name}`")
        classes.append(cls)
    return classes


def unit_settings(cls: type[Unit], raw: dict[str, Any] | None) -> UnitSettings:
    try:
        return cls.Settings.model_validate(raw or {})
    except ValidationError as exc:
        # Prefix every path with units.<name> so the operator finds the field.
        text = format_validation_error(exc).replace("\n  ", f"\n  units.{cls.name}.")
        raise ConfigError(text.replace(f"units.{cls.name}.(top level)", f"units.{cls.name}")) from None


def build_units(gateway: Gateway) -> list[Unit]:
    """Instantiate the configured units in order, validating their settings."""
    settings = gateway.settings
    names = settings.pipeline
    unknown = set(settings.units) - set(names)
    if unknown:
        raise ConfigError(f"invalid configuration:\n  units.{sorted(unknown)[0]}: not in the pipeline")
    return [cls(unit_settings(cls, settings.units.get(cls.name)), gateway) for cls in unit_classes(names)]


def chain(units: list[Unit], terminal: Next) -> list[Next]:
    """Compose the units around the terminal handler, once per process.

    Returns one entry point per unit (the pipeline from that unit on) and the
    terminal last: the first is the whole pipeline, the others serve
    `Gateway.submit`.
    """
    entries: list[Next] = [terminal]
    for unit in reversed(units):
        entries.append(_bind(unit, entries[-1]))
    entries.reverse()
    return entries


def _bind(unit: Unit, next: Next) -> Callable[[Call], Awaitable[Reply]]:
    # A plain function, not a wrapping coroutine: calling it returns the unit's
    # own coroutine, so each unit costs one coroutine frame per request, not two.
    def step(call: Call) -> Awaitable[Reply]:
        return unit(call, next)

    step.__qualname__ = f"{type(unit).__name__}.step"
    return step
