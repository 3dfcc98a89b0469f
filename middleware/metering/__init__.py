"""Prepaid credits: holds before forwarding, settlement from usage (unit, pricing, hold scripts)."""

from middleware.metering.unit import MeteringUnit

__all__ = ["MeteringUnit"]
