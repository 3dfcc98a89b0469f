"""Per-key requests per minute and concurrency, shared by all replicas (unit, ratelimit.lua)."""

from middleware.rate_limit.unit import RateLimitUnit

__all__ = ["RateLimitUnit"]
