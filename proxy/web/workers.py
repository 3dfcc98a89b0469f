"""Several worker processes on one port: ``sovereign serve --workers N``.

The design is a supervisor and N re-executed workers, each binding the port
with ``SO_REUSEPORT``; not pre-fork. Why:

* a worker is a fresh interpreter running the ordinary single-process serve
  path (`proxy.web.server.serve_async`): its own event loop, Redis pool,
  upstream pool and gc.freeze, nothing inherited from a parent that has
  already imported, connected or started threads (forking any of those is
  where pre-fork servers get their subtle bugs);
* with ``SO_REUSEPORT`` every worker has its own listening socket and the
  kernel spreads new connections over them by hash, instead of all workers
  waking on one shared accept queue and the busiest one winning most of them;
* a worker that dies is replaced by starting the same command again.

The supervisor (this module, in the parent) never serves a request. It:

* refuses a ``memory://`` store with more than one worker (each worker would
  have its own tenants, keys and credits): `check_workers`, exit code 2;
* gives the workers one private ``PROMETHEUS_MULTIPROC_DIR`` (a temporary
  directory in /dev/shm, else $TMPDIR, removed at exit; one left by a
  supervisor killed with SIGKILL is swept by the next), so each worker's
  ``/metrics`` reports the sum over all of them (see `proxy.core.metrics`);
* starts the workers and waits until every one is listening (each writes to
  a pipe it inherits). A worker that exits before that fails the whole start,
  with its exit code: a busy port or a bad store would fail every retry too;
* on SIGTERM or SIGINT sends SIGTERM to every worker, so each runs the normal
  drain (readiness false, new requests 503 ``draining``, open streams get
  ``server.drain_seconds``), waits for them (SIGKILL after the grace plus a
  margin) and exits 0 when all exited 0, else 1;
* when a worker dies unexpectedly, logs ``worker.exited`` (error level, with
  its exit code or signal) and starts a replacement at once, then with a
  doubling pause (up to 30 s) while replacements keep dying within 10 s.
  Replacing rather than exiting keeps the other workers' open streams: a
  crash of one worker cuts only its own connections.

Workers die with the supervisor (``PR_SET_PDEATHSIG``), so a supervisor
killed with SIGKILL leaves none behind. With ``server.workers: 1`` none of
this runs: ``sovereign serve`` is the single process it always was.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from proxy.core.settings import ConfigError, Settings

log = structlog.get_logger("sovereign")

WORKER_HEADER = "x-sovereign-worker"  # the pid of the worker that served a response (only with several workers)
QUICK_DEATH_SECONDS = 10.0  # a replacement that dies sooner than this doubles the next pause
MAX_RESTART_PAUSE = 30.0
SHUTDOWN_MARGIN = 10.0  # beyond drain_seconds, for a worker's cleanup (settlement flush) before SIGKILL
_PR_SET_PDEATHSIG = 1
_METRICS_PREFIX = "sovereign-metrics-"  # then the supervisor's pid: a directory whose owner is gone can be swept


def check_workers(settings: Settings) -> None:
    """Refuse settings that cannot run as several workers (raises ConfigError, one line)."""
    if settings.server.workers > 1 and settings.store.url.startswith("memory://"):
        raise ConfigError(
            f"server.workers: {settings.server.workers} workers need a shared store, but store.url is memory://,"
            " which lives inside one process; use a redis:// store or run one worker"
        )


# -- inside a worker --------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process knows of its place: its slot and the pipe that reports it listening."""

    index: int
    ready_fd: int | None = None


def become_worker(role: WorkerRole) -> None:
    """Process-wide set-up of a worker, before it serves: die with the supervisor, label its log lines."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # an orphaned worker drains and exits
    config = structlog.get_config()

    def label(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("worker", role.index)
        return event

    structlog.configure(processors=[label, *config["processors"]])


def prepare_app(app: web.Application) -> None:
    """Name the serving worker's pid on every response (before the app is frozen)."""
    pid = str(os.getpid())

    async def tag(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = pid

    app.on_response_prepare.append(tag)


def announce_ready(role: WorkerRole) -> None:
    """Tell the supervisor this worker listens; a supervisor already gone means: stop."""
    if role.ready_fd is None:
        return
    try:
        os.write(role.ready_fd, b"ready")
    except BrokenPipeError:
        os.kill(os.getpid(), signal.SIGTERM)  # the normal drain, then exit
    finally:
        os.close(role.ready_fd)


# -- the supervisor ---------------------------------------------------------------------


@dataclass
class Worker:
    """One worker slot: its current process (replaced when it dies)."""

    index: int
    popen: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    started_at: float = 0.0
    listening: bool = False  # the current process reported ready


class Supervisor:
    """Starts, watches, replaces and drains the worker processes of one `sovereign serve`."""

    def __init__(self, settings: Settings, config: str | None) -> None:
        self.settings = settings
        self.count = settings.server.workers
        self.config = str(Path(config).resolve()) if config else None
        self.metrics_dir: str | None = None
        self.port = settings.server.port
        self.workers = [Worker(i) for i in range(self.count)]
        self.stop = asyncio.Event()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the process's exit code."""
        self.metrics_dir = _metrics_directory() if self.settings.metrics.enabled else None
        reserved = None
        try:
            if self.port == 0:
                reserved = _reserve_port(self.settings.server.host)
                self.port = reserved.getsockname()[1]
            return asyncio.run(self._run())
        finally:
            if reserved is not None:
                reserved.close()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        log.info("workers.starting", workers=self.count, port=self.port, supervisor_pid=os.getpid(), metrics_dir=self.metrics_dir)
        for worker in self.workers:
            self._spawn(worker)
        failed = await self._boot()
        if failed is not None:
            await self._shutdown()
            return failed
        if self.stop.is_set():
            return await self._shutdown()
        log.info(
            "workers.ready",
            workers=self.count,
            address=f"http://{self.settings.server.host}:{self.port}",
            pids=[w.popen.pid for w in self.workers if w.popen is not None],
        )
        keepers = [asyncio.ensure_future(self._keep(worker)) for worker in self.workers]
        await self.stop.wait()
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        return await self._shutdown()

    def _spawn(self, worker: Worker) -> None:
        """Start the worker's process (synchronous: nothing can interrupt it half-way)."""
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, "-m", "proxy", "serve"]
        if self.config is not None:
            argv += ["--config", self.config]
        argv += ["--workers", str(self.count), "--worker-index", str(worker.index),
                 "--worker-ready-fd", str(write_fd), "--worker-port", str(self.port)]
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        try:
            worker.popen = subprocess.Popen(argv, env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        worker.ready_fd = read_fd
        worker.started_at = time.monotonic()
        worker.listening = False

    async def _ready(self, worker: Worker) -> bool:
        """True once the worker reports listening; False when it exits first."""
        fd, worker.ready_fd = worker.ready_fd, None
        assert fd is not None
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _settle, readable)
        try:
            await readable
            worker.listening = os.read(fd, 16) == b"ready"
            return worker.listening
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def _boot(self) -> int | None:
        """Wait until every worker listens (or a stop signal); the exit code if one failed first."""
        pending = {asyncio.ensure_future(self._ready(w)): w for w in self.workers}
        stopped = asyncio.ensure_future(self.stop.wait())
        failed: int | None = None
        try:
            while pending and not stopped.done() and failed is None:
                done, _ = await asyncio.wait([*pending, stopped], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    worker = pending.pop(task, None)
                    if worker is None or task.result():
                        continue
                    assert worker.popen is not None
                    code = await _exited(worker.popen)
                    log.error("worker.failed_to_start", worker=worker.index, pid=worker.popen.pid, exit=_describe(code))
                    failed = code if code > 0 else 1
        finally:
            for task in [*pending, stopped]:
                task.cancel()
            await asyncio.gather(*pending, stopped, return_exceptions=True)
        return failed

    async def _keep(self, worker: Worker) -> None:
        """Replace the worker whenever it dies, pausing longer while replacements keep dying young."""
        quick_deaths = 0
        while True:
            assert worker.popen is not None
            code = await _exited(worker.popen)
            lived = time.monotonic() - worker.started_at
            self._forget(worker.popen.pid)
            quick_deaths = quick_deaths + 1 if lived < QUICK_DEATH_SECONDS else 0
            pause = min(MAX_RESTART_PAUSE, 0.5 * 2 ** (quick_deaths - 1)) if quick_deaths > 1 else 0.0
            log.error(
                "worker.exited", worker=worker.index, pid=worker.popen.pid, exit=_describe(code),
                lived_seconds=round(lived, 1), restart_in_seconds=pause,
            )
            await asyncio.sleep(pause)
            self._spawn(worker)
            if await self._ready(worker):
                log.info("worker.restarted", worker=worker.index, pid=worker.popen.pid)

    def _forget(self, pid: int) -> None:
        """Drop a dead worker's live gauges (open streams, holds); its counters stay in the sums."""
        if self.metrics_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, self.metrics_dir)

    async def _shutdown(self) -> int:
        """SIGTERM every live worker, wait for their drain; 0 when all exited cleanly."""
        alive = [w for w in self.workers if w.popen is not None and w.popen.poll() is None]
        grace = self.settings.server.drain_seconds + SHUTDOWN_MARGIN
        log.info("workers.draining", workers=len(alive), grace_seconds=self.settings.server.drain_seconds)
        for worker in alive:
            assert worker.popen is not None
            with contextlib.suppress(ProcessLookupError):
                worker.popen.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(self._stopped(worker, grace) for worker in alive))
        # One still starting may die of the SIGTERM before its handler is in place: it served nothing.
        codes = [0 if c == -signal.SIGTERM and not w.listening else c for w, c in zip(alive, codes, strict=True)]
        for worker in self.workers:
            if worker.ready_fd is not None:  # spawned but never awaited
                os.close(worker.ready_fd)
                worker.ready_fd = None
        log.info("workers.stopped", exits={str(w.index): _describe(c) for w, c in zip(alive, codes, strict=True)})
        return 0 if all(code == 0 for code in codes) else 1

    async def _stopped(self, worker: Worker, grace: float) -> int:
        assert worker.popen is not None
        try:
            return await asyncio.wait_for(_exited(worker.popen), grace)
        except TimeoutError:
            log.warning("worker.killed", worker=worker.index, pid=worker.popen.pid, after_seconds=grace)
            worker.popen.kill()
            return await _exited(worker.popen)


async def _exited(popen: subprocess.Popen[bytes]) -> int:
    """Wait for a child's exit without a thread: a pidfd becomes readable when it ends (Linux ≥ 5.3)."""
    try:
        fd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):  # no pidfds, or already reaped
        while popen.poll() is None:
            await asyncio.sleep(0.2)
        return popen.returncode
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _settle, ended)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return popen.wait()


def _settle(future: asyncio.Future[None]) -> None:
    """A reader callback: the fd became readable (it stays so until removed)."""
    if not future.done():
        future.set_result(None)


def _describe(code: int) -> str:
    """An exit status as people read it: ``code 3`` or ``signal SIGKILL``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _metrics_directory() -> str:
    """A private directory for the workers' metric files: in /dev/shm when writable, else $TMPDIR.

    /dev/shm is memory (no disk write-back of the mmapped files) and stays
    writable in containers whose root filesystem is read-only.
    """
    errors = []
    for parent in ("/dev/shm", tempfile.gettempdir()):
        try:
            made = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-", dir=parent)
        except OSError as exc:
            errors.append(f"{parent}: {exc.strerror}")
            continue
        _sweep_stale_metrics(Path(parent))
        return made
    raise ConfigError(f"server.workers: no writable directory for the workers' metrics ({'; '.join(errors)}); set TMPDIR")


def _sweep_stale_metrics(parent: Path) -> None:
    """Remove the metrics directories of supervisors that are gone (killed with SIGKILL, they could not clean up)."""
    for directory in parent.glob(f"{_METRICS_PREFIX}*-*"):
        owner = directory.name.removeprefix(_METRICS_PREFIX).partition("-")[0]
        if not (owner.isascii() and owner.isdigit()):
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except OSError:  # alive, someone else's
            pass


def _reserve_port(host: str) -> socket.socket:
    """Pick a free port for ``server.port: 0`` and hold it (bound, not listening) for the workers to share."""
    family = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def supervise(settings: Settings, config: str | None) -> int:
    """Run `settings.server.workers` workers until stopped; the exit code."""
    return Supervisor(settings, config).run()
