"""Identifiers the gateway makes: one place decides how random each kind must be.

- `new_id(prefix)`: object ids a client may hold and present again (responses,
  items, sessions): 128 bits from the OS, so they cannot be guessed.
- `unique_id(prefix, bits)`: ids that must only not collide (request ids, hold
  and tool-call ids): the PRNG, which avoids a urandom syscall on the hot path.
"""

from __future__ import annotations

import os
from collections import deque
from random import getrandbits

# new_id's randomness is read from the OS 64 ids at a time: one getrandom call
# instead of one per id (three per Responses request). A deque because its
# popleft and extend are atomic, so threads may share it without a lock; a
# forked child empties it, so parent and child never hand out the same id.
_BATCH = 64
_spare: deque[str] = deque()
os.register_at_fork(after_in_child=_spare.clear)


def new_id(prefix: str) -> str:
    try:
        return prefix + _spare.popleft()
    except IndexError:
        pool = os.urandom(16 * _BATCH).hex()
        _spare.extend(pool[i:i + 32] for i in range(32, 32 * _BATCH, 32))
        return prefix + pool[:32]


def unique_id(prefix: str = "", bits: int = 96) -> str:
    return f"{prefix}{getrandbits(bits):0{bits // 4}x}"
