"""Settlements that are never dropped: retried until the store answers, spooled to disk when they must leave memory.

A `Settlement` is one settle or release script call (its keys and arguments,
plus the request id, tenant and credits for the logs). `SettlementQueue.write`
tries it once; when the store is down it is kept in memory and a background
loop retries it, with backoff capped at `retry_max_seconds`, until the store
answers. Retries are safe because the scripts are idempotent: a settlement is
recorded once per request id (``ledger_ids``), a release of a gone hold is a
no-op, so a settlement written twice (a timeout whose write had landed, a
replayed spool line) changes nothing the second time.

With a spool directory, a settlement the store could not take goes to the
spool (`SettlementSpool`, one JSON line each, fsynced) at once, in the
background: a replica killed outright during a Redis outage then loses only
the settlements of that moment, not every one of the outage. Without one they
wait in memory, and leave it only at shutdown. The spool is replayed whenever the store answers
again and at start-up — including the files of processes that died or exited
with settlements spooled (a file is another process' only while that process
holds its lock) — then truncated or deleted. A line that cannot be parsed (a
crash mid-write, a damaged file) is logged and skipped.

Without a spool directory nothing is ever written to disk: past the memory
bound settlements stay in memory (with a warning), and those still pending at
exit are logged as ``metering.settle_failed``, the only way one is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from proxy.core.errors import StoreUnavailable
from proxy.core.settings import ConfigError
from proxy.store.accounts import now_ms
from proxy.store.store import Script, Store

log = structlog.get_logger("sovereign")

# First pause after a failed attempt; it doubles up to the queue's cap.
FIRST_PAUSE = 0.05
# Settlements sent together when the queue flushes (they share the pipelined connection).
BATCH = 256
SPOOL_PATTERN = "settlements-*.jsonl"


@dataclass(slots=True)
class Settlement:
    """One settle or release script call, as the queue retries and the spool stores it."""

    script: str  # a Script's name (see SettlementQueue.scripts)
    keys: list[str]
    args: list[Any]
    request_id: str
    tenant: str
    credits: int
    now_at: int | None = None  # insert the current time (ms) into the arguments at this index when sent
    done: Callable[[], None] | None = None  # called once when it leaves this process (never spooled)

    def to_line(self) -> bytes:
        return orjson.dumps(
            {"script": self.script, "keys": self.keys, "args": self.args, "request_id": self.request_id,
             "tenant": self.tenant, "credits": self.credits, "now_at": self.now_at}
        ) + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Settlement:
        """Parse a spool line; ValueError (with what is wrong) for anything that is not a complete settlement."""
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError("not an object")
        script, keys, args = data.get("script"), data.get("keys"), data.get("args")
        if not isinstance(script, str) or not isinstance(keys, list) or not isinstance(args, list):
            raise ValueError("script, keys or args missing")
        if not all(isinstance(k, str) for k in keys) or not all(isinstance(a, (str, int)) for a in args):
            raise ValueError("keys or args of the wrong type")
        credits, now_at = data.get("credits"), data.get("now_at")
        return cls(script, keys, args, str(data.get("request_id", "")), str(data.get("tenant", "")),
                   credits if type(credits) is int else 0, now_at if type(now_at) is int else None)

    def finish(self) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            done()


class SettlementSpool:
    """Settlements on disk: this process' own file (locked while it lives) and the files of others that are gone."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"settlements-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._file: Any = None
        self.lines = 0  # lines in this process' file (pending settlements)
        self._check()

    def _check(self) -> None:
        """Refuse a directory this process cannot write (at start-up, not at the exit that needs it)."""
        probe = self.directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"invalid configuration:\n  store.spool_dir: cannot write to {self.directory} ({exc.strerror or exc})"
            ) from None

    def append(self, settlements: list[Settlement]) -> None:
        """Append and fsync (blocking: run it in a thread from the event loop; the caller counts `lines`)."""
        if not settlements:
            return
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+b")
            fcntl.flock(self._file, fcntl.LOCK_EX)  # ours while we live: no other process replays it
            _fsync_directory(self.directory)  # the new file's name must survive a crash too
        self._file.write(b"".join(s.to_line() for s in settlements))
        self._file.flush()
        os.fsync(self._file.fileno())

    def read_own(self) -> list[bytes]:
        if self._file is None or not self.lines:
            return []
        self._file.seek(0)
        return self._file.read().splitlines()

    def truncate_own(self) -> None:
        if self._file is not None:
            self._file.truncate(0)
            os.fsync(self._file.fileno())
        self.lines = 0

    def orphans(self) -> list[Path]:
        """Spool files of other processes, oldest first (whether their owners still live is checked on claim)."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob(SPOOL_PATTERN) if p != self.path]
        return sorted(found, key=lambda p: p.stat().st_mtime if p.exists() else 0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None
            if not self.lines:
                self.path.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_lines(lines: list[bytes], origin: str) -> list[Settlement]:
    """The settlements of a spool file; a corrupt or truncated line is logged and skipped."""
    settlements = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            settlements.append(Settlement.from_line(line))
        except ValueError as exc:
            log.error("metering.spool_line_skipped", file=origin, line=number, error=str(exc))
    return settlements


class SettlementQueue:
    """Writes settlements; keeps, retries and spools the ones the store could not take (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        scripts: list[Script],
        *,
        on_count: Callable[[int], None],
        spool_dir: str | None,
        memory_limit: int,
        retry_max_seconds: float,
        on_written: Callable[[Settlement, Any], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.on_written = on_written  # told each script's answer once it is written
        self.scripts = {script.name: script for script in scripts}
        self.on_count = on_count  # told the pending count whenever it changes (the gauge)
        self.spool = SettlementSpool(spool_dir) if spool_dir else None
        self.memory_limit = memory_limit
        self.retry_max_seconds = retry_max_seconds
        self.pending: collections.deque[Settlement] = collections.deque()
        self._in_transit = 0  # taken from `pending`: being retried or spooled
        self._spooling: asyncio.Task[None] | None = None  # moving what is pending to the spool
        self._spool_lock = asyncio.Lock()  # one user of this process' spool file at a time
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned_memory = False

    @property
    def count(self) -> int:
        """Settlements of this process not yet in the store (in memory or in its spool file)."""
        return len(self.pending) + self._in_transit + (self.spool.lines if self.spool else 0)

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Start the retry loop; it replays spool files left by earlier processes as soon as the store answers."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self.spool is not None and self.spool.orphans():
            self._wake.set()

    async def close(self) -> None:
        """At exit: one last try if the store answers, then spool what is left (or log it as lost)."""
        if self._task is not None:
            # Not cancelled: a step cut in the middle could lose the batch it
            # holds. The loop stops after its current step (one store timeout at most).
            self._stop.set()
            self._wake.set()
            await self._task
            self._task = None
        if self._spooling is not None:
            await self._spooling
        if self.count and await self.store.ping():
            await self._flush() and await self._replay()
        left = list(self.pending)
        self.pending.clear()
        lost = "no store.spool_dir: not written to disk" if self.spool is None else ""
        if left and self.spool is not None:
            try:
                async with self._spool_lock:
                    await asyncio.to_thread(self.spool.append, left)
            except OSError as exc:  # the volume went away, filled up or turned read-only since start-up
                lost = f"the spool could not be written ({exc.strerror or exc})"
            else:
                self.spool.lines += len(left)
                log.warning("metering.settlements_spooled", count=len(left), file=str(self.spool.path))
        for settlement in left:
            if lost:
                _log_lost(settlement, lost)
            settlement.finish()
        self._update_gauge()
        if self.spool is not None:
            self.spool.close()

    # -- writing ---------------------------------------------------------
    async def write(self, settlement: Settlement, deferred: bool = False) -> None:
        """Try once now; on a store error keep it for the retry loop."""
        if not await self._send(settlement, deferred):
            self._keep(settlement)

    def _keep(self, settlement: Settlement) -> None:
        self.pending.append(settlement)
        self._update_gauge()
        self._wake.set()
        if self.spool is not None and (self._spooling is None or self._spooling.done()):
            # The store just failed it: on disk before anything else (one fsync for all that piled up).
            self._spooling = asyncio.get_running_loop().create_task(self._spool_pending("store unavailable"))

    async def _send(self, settlement: Settlement, deferred: bool = False) -> bool:
        """One attempt; True when done (written, or failed in a way no retry can fix), False when the store is down."""
        script = self.scripts.get(settlement.script)
        if script is None:
            _log_lost(settlement, f"unknown script {settlement.script!r}")
            settlement.finish()
            return True
        args = settlement.args
        if settlement.now_at is not None:
            args = [*args[: settlement.now_at], now_ms(), *args[settlement.now_at :]]
        try:
            result = await self.store.run(script, settlement.keys, args, deferred)
            if self.on_written is not None:
                await self.on_written(settlement, result)
        except StoreUnavailable:
            return False
        except Exception as exc:  # a script error: retrying cannot help
            _log_lost(settlement, repr(exc))
        settlement.finish()
        return True

    # -- the retry loop --------------------------------------------------
    async def _run(self) -> None:
        pause = FIRST_PAUSE
        while True:
            await self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            if await self._flush() and await self._replay():
                pause = FIRST_PAUSE
                continue  # everything written (until the next wake)
            self._wake.set()  # keep trying
            if self._stop.is_set():
                return
            if self.spool is not None and self.pending:
                await self._spool_pending("store unavailable")
            elif len(self.pending) > self.memory_limit and not self._warned_memory:
                self._warned_memory = True
                log.warning("metering.settlements_over_memory_bound", pending=len(self.pending),
                            message="no store.spool_dir: pending settlements stay in memory")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)  # a pause that close() cuts short
            pause = min(pause * 2, self.retry_max_seconds)

    async def _flush(self) -> bool:
        """Send what is pending, oldest first, in batches; False at the first batch that met a store error."""
        while self.pending:
            batch = [self.pending.popleft() for _ in range(min(BATCH, len(self.pending)))]
            self._in_transit += len(batch)
            try:
                results = await asyncio.gather(*(self._send(s) for s in batch))
            finally:
                self._in_transit -= len(batch)
            failed = [s for s, ok in zip(batch, results, strict=True) if not ok]
            if failed:
                self.pending.extendleft(reversed(failed))
                self._update_gauge()
                return False
        self._update_gauge()
        return True

    async def _spool_pending(self, reason: str) -> None:
        assert self.spool is not None
        moved = list(self.pending)
        self.pending.clear()
        if not moved:
            return
        self._in_transit += len(moved)
        try:
            async with self._spool_lock:
                await asyncio.to_thread(self.spool.append, moved)
                self.spool.lines += len(moved)
        except OSError as exc:
            # Kept in memory instead (retried as before), not a settlement lost.
            self._in_transit -= len(moved)
            self.pending.extendleft(reversed(moved))
            self._update_gauge()
            log.error("metering.spool_failed", count=len(moved), file=str(self.spool.path), error=exc.strerror or str(exc))
            return
        self._in_transit -= len(moved)
        for settlement in moved:
            settlement.finish()
        self._update_gauge()
        log.warning("metering.settlements_spooled", count=len(moved), file=str(self.spool.path), reason=reason)

    async def _replay(self) -> bool:
        """Write this process' spool and the spool files of gone processes; False when the store went away meanwhile."""
        if self.spool is None:
            return True
        if self.spool.lines:
            async with self._spool_lock:  # no line appended between the read and the truncation
                if not await self._replay_lines(self.spool.read_own(), str(self.spool.path)):
                    return False
                await asyncio.to_thread(self.spool.truncate_own)
            self._update_gauge()
        for path in self.spool.orphans():
            if not await self._replay_orphan(path):
                return False
        return True

    async def _replay_orphan(self, path: Path) -> bool:
        try:
            file = open(path, "rb")
        except FileNotFoundError:
            return True  # another process replayed it meanwhile
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # its process is alive and owns it
            if not path.exists():
                return True  # replayed and deleted by another process between open and lock
            if not await self._replay_lines(file.read().splitlines(), str(path)):
                return False
            path.unlink()
        log.info("metering.spool_replayed", file=str(path))
        return True

    async def _replay_lines(self, lines: list[bytes], origin: str) -> bool:
        settlements = parse_lines(lines, origin)
        for start in range(0, len(settlements), BATCH):
            results = await asyncio.gather(*(self._send(s) for s in settlements[start : start + BATCH]))
            if not all(results):
                return False  # replayed again later: what was written is not written twice
        return True

    def _update_gauge(self) -> None:
        self.on_count(self.count)


def _log_lost(settlement: Settlement, error: str) -> None:
    log.error(
        "metering.settle_failed",
        request_id=settlement.request_id,
        tenant=settlement.tenant,
        credits=settlement.credits,
        error=error,
        message="settlement not written (a served request goes uncharged); its hold expires by itself",
    )
