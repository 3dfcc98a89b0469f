"""The unit pipeline: registration by name, per-unit settings, and chaining.

A unit is a class with a ``name``, a pydantic ``Settings`` model and an async
``__call__(call, next) -> Reply``. Built-in units are found by name in
`BUILTIN_UNITS`; third-party units register under the entry-point group
``sovereign.middleware``. The pipeline's order and each unit's settings come
from the config; unknown names and bad settings fail at start-up with the
field path (``units.metering.on_low_balance``).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.core.call import Call, Next, Reply
from proxy.core.settings import ConfigError, format_validation_error

if TYPE_CHECKING:
    from proxy.core.gateway import Gateway

ENTRY_POINT_GROUP = "sovereign.middleware"

BUILTIN_UNITS: dict[str, str] = {
    "auth": "middleware.auth:AuthUnit",
    "rate_limit": "middleware.rate_limit:RateLimitUnit",
    "validation": "middleware.validation:ValidationUnit",
    "responses": "middleware.responses:ResponsesUnit",
    "sessions": "middleware.sessions:SessionsUnit",
    "legacy_functions": "middleware.legacy_functions:LegacyFunctionsUnit",
    "metering": "middleware.metering:MeteringUnit",
}


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

    async def __call__(self, call: Call, next: Next) -> Reply:
        return await next(call)

    def routes(self) -> list[web.RouteDef]:
        """Extra HTTP routes this unit serves (mounted at the root app)."""
        return []

    async def startup(self) -> None:
        """Runs once the event loop and the store are up."""

    async def shutdown(self) -> None:
        """Runs at exit, after open requests have drained."""


def _import(target: str) -> type[Unit]:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def find_unit(name: str) -> type[Unit] | None:
    if name in BUILTIN_UNITS:
        return _import(BUILTIN_UNITS[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    return None


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


def chain(units: list[Unit], terminal: Next) -> Next:
    """Compose the units around the terminal handler, once per process."""
    handler: Next = terminal
    for unit in reversed(units):
        handler = _bind(unit, handler)
    return handler


def _bind(unit: Unit, next: Next) -> Callable[[Call], Awaitable[Reply]]:
    # A plain function, not a wrapping coroutine: calling it returns the unit's
    # own coroutine, so each unit costs one coroutine frame per request, not two.
    def step(call: Call) -> Awaitable[Reply]:
        return unit(call, next)

    step.__qualname__ = f"{type(unit).__name__}.step"
    return step
