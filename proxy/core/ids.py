"""Identifiers the gateway makes: one place decides how random each kind must be.

- `new_id(prefix)`: object ids a client may hold and present again (responses,
  items, sessions): 128 bits from the OS, so they cannot be guessed.
- `unique_id(prefix, bits)`: ids that must only not collide (request ids, hold
  and tool-call ids): the PRNG, which avoids a urandom syscall on the hot path.
"""

from __future__ import annotations

import os
from random import getrandbits


def new_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


def unique_id(prefix: str = "", bits: int = 96) -> str:
    return f"{prefix}{getrandbits(bits):0{bits // 4}x}"
