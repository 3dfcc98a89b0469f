"""Sovereign: an OpenAI-compatible, multi-tenant, metered gateway on aiohttp."""

__version__ = "0.1.0"
