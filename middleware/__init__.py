"""Sovereign's built-in pipeline units, one per module.

Each module defines one `proxy.pipeline.Unit` subclass, registered by name in
`proxy.pipeline.BUILTIN_UNITS` and under the ``sovereign.middleware`` entry
point group. The order comes from the ``pipeline`` setting.
"""
