"""The event loop every serving command runs on: `run(main)`.

`sovereign serve` (each worker too), `sovereign demo` and `sovereign
mock-upstream` run their main coroutine here, on uvloop's loop (production's)
when it is installed, asyncio's otherwise. A loop factory, not a global loop
policy: nothing else in the process is affected (the policy API is deprecated
from Python 3.14 on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's `new_event_loop` when uvloop is installed; None (asyncio's own loop) otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable without it
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to its end on a new event loop (see the module), then close the loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
