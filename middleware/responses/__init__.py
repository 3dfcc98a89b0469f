"""The Responses API on top of chat completions (unit, request and stream translators, store)."""

from middleware.responses.unit import ResponsesUnit

__all__ = ["ResponsesUnit"]
