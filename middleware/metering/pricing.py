"""Pure credit arithmetic for the metering unit: prices, costs and token estimates.

Nothing here touches the network or the store, so every rule is unit-testable.
Credits are integers; a request's cost is

    ceil((uncached_input * input + cached_input * cached + output * output) / 1e6) + per_request

with prices in credits per million tokens (rounding up, never down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from proxy.core.settings import ModelSettings, Settings

MILLION = 1_000_000
# Chat templates add a few tokens per message (role markers, separators).
TOKENS_PER_MESSAGE = 8
# Output estimate when the provider reports no usage: ~4 characters per token
# for English text, and never fewer tokens than content chunks (a provider
# streams at least one token per chunk).
CHARS_PER_OUTPUT_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Pricing:
    """What one public model costs and how its output is capped."""

    input: int
    output: int
    cached: int
    per_request: int
    free: bool
    max_output_tokens: int
    output_cap_param: str

    @classmethod
    def of(cls, entry: ModelSettings, target: ModelSettings) -> Pricing:
        """An alias uses its own price when it has one, else its target's."""
        price = entry.price or target.price
        free = entry.free or (entry.price is None and target.free)
        if price is None:
            return cls(0, 0, 0, 0, True, target.max_output_tokens, target.output_cap_param)
        cached = price.input_per_million if price.cached_input_per_million is None else price.cached_input_per_million
        return cls(
            price.input_per_million,
            price.output_per_million,
            cached,
            price.per_request,
            free,
            target.max_output_tokens,
            target.output_cap_param,
        )

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> int:
        """Credits for a request, rounded up; 0 for a free model."""
        if self.free:
            return 0
        micro = input_tokens * self.input + output_tokens * self.output
        if cached_tokens > 0:  # (a hold has none): those input tokens at the cached price instead
            # Clamped to input_tokens without min(): in 3.11 it parses its arguments
            # generically (≈ 140 ns), and this runs twice per request.
            cached = input_tokens if cached_tokens > input_tokens else cached_tokens
            micro -= cached * (self.input - self.cached)
        return -(-micro // MILLION) + self.per_request

    def affordable_output(self, input_tokens: int, n: int, available: int) -> int:
        """The largest per-choice output cap whose hold fits in `available` (0 if none)."""
        if self.output == 0:
            return self.max_output_tokens if self.cost(input_tokens, 0) <= available else 0
        budget = (available - self.per_request) * MILLION - input_tokens * self.input
        return max(0, budget // (self.output * max(n, 1)))


def pricing_table(settings: Settings) -> dict[str, Pricing]:
    """Pricing per public model name (aliases included), built once per process."""
    table = {}
    for public in settings.models:
        resolved = settings.resolve_model(public)
        assert resolved is not None
        table[public] = Pricing.of(settings.models[public], resolved[1])
    return table


def prompt_estimate(body_bytes: int, messages: int, chars_per_token: float) -> int:
    """A conservative prompt-token estimate from the request's JSON size.

    A BPE token is at least one byte of UTF-8 text, so the bytes of everything
    the model reads (messages, tools, response format — all inside the body)
    bound the prompt tokens from above; the JSON around them only adds bytes.
    `chars_per_token` = 1 makes the bound strict; the default 3 sits below the
    ~4 bytes per token of English text and code. Chat templates add
    `TOKENS_PER_MESSAGE` per message.
    """
    return math.ceil(body_bytes / chars_per_token) + TOKENS_PER_MESSAGE * messages


def output_estimate(chunks: int, chars: int) -> int:
    """Output tokens of delivered content when the provider reports none."""
    return max(chunks, -(-chars // CHARS_PER_OUTPUT_TOKEN))


def positive_int(value: Any) -> int | None:
    """`value` if it is a non-negative integer (not a bool), else None."""
    return value if type(value) is int and value >= 0 else None


# Request fields that cap the output, in the order a provider honours them.
CAP_FIELDS = ("max_completion_tokens", "max_tokens")


def output_cap(body: dict[str, Any]) -> int | None:
    """The client's output cap: max_completion_tokens, else max_tokens; None when absent."""
    for field in CAP_FIELDS:
        value = body.get(field)
        if type(value) is int and value >= 0:  # positive_int, inline: this runs once per request
            return value
    return None


def choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if type(n) is int and n >= 1 else 1


def embeddings_usage(usage: Any) -> dict[str, int] | None:
    """An embeddings reply's usage (prompt tokens only) in the chat shape settlement reads; None if unusable."""
    prompt = positive_int(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
    if prompt is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
