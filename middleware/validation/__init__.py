"""Input validation against the OpenAI request schemas (unit, schemas)."""

from middleware.validation.unit import ValidationUnit

__all__ = ["ValidationUnit"]
