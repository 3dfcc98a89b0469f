"""The Anthropic Messages API on top of chat completions (unit, request/reply/stream translators, errors)."""

from middleware.messages.unit import MessagesUnit

__all__ = ["MessagesUnit"]
