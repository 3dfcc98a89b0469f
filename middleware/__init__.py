"""Sovereign's built-in pipeline units: one module, or one package, per unit.

A unit is a `proxy.core.pipeline.Unit` subclass registered by name under the
``sovereign.middleware`` entry-point group (setup.cfg lists the built-ins).
A unit with more than one module is a package that owns its modules and its
Lua scripts and exports the unit class from its ``__init__``:

    auth               keys, per-key model access, GET /v1/credits
    rate_limit/        per-key rpm and concurrency (ratelimit.lua)
    validation/        request schemas and the validation unit
    responses/         the Responses API: request and stream translators, the response store
    sessions/          X-Session-ID sessions: the session store and its scripts, titles
    legacy_functions   functions/function_call on top of tools
    metering/          credit holds and settlement: pricing, the hold scripts

The order comes from the ``pipeline`` setting.
"""
