"""``--workers N``: N server processes sharing one port, supervised by the parent.

Each worker is a forked child running the ordinary threaded server (:mod:`.serving`) on its
own listening socket with ``SO_REUSEPORT``; the kernel spreads new connections over them, so N
processes use N cores despite the GIL. The parent only supervises: it reserves the port (port
0 becomes a real one before any worker starts), restarts a worker that dies, and on a stop
signal stops them all. A worker never outlives the parent, whatever ends it (SIGKILL too).
``max_clients`` applies to each worker.

Every process starts its log thread after forking: a thread does not survive a fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import time
from typing import Callable

from .config import Settings
from .errors import ServerStartError
from .logs import LogWriter, background_logging, exit_status
from .plural import plural
from .server import bind_error_message
from .server.stop import LOG_DONE, LOG_FLUSH_SECONDS
from .serving import STOP_SIGNALS, listen, serve
from .system import format_address, listen_address

log = logging.getLogger(__name__)

#: How long the parent waits for every worker to be listening.
READY_SECONDS = 10.0
#: More restarts than this within RESTART_WINDOW seconds means the workers cannot run: give up.
MAX_RESTARTS, RESTART_WINDOW = 5, 10.0

#: What the parent waits for: a stop request, or a worker that ended.
_PARENT_SIGNALS = STOP_SIGNALS | {signal.SIGCHLD}

#: prctl(2) option: the signal a process gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def _reserve_port(settings: Settings) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket, so port 0 becomes one real port.

    It receives no connections; it keeps the port ours while workers come and go.
    """
    family, address = listen_address(settings.host, settings.port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _die_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when *parent* dies (Linux), so the worker
    stops in order and frees the port; if the parent is gone already, stop now."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no prctl
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl: SIGTERM is blocked, serve() takes it
        os.kill(os.getpid(), signal.SIGTERM)


def _start_worker(settings: Settings, port: int, ready_fd: int) -> int:
    """Fork one worker; the child serves until signalled and never returns here."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        _die_with_parent(parent)
        with background_logging(settings.log_level, exit_seconds=LOG_DONE,
                                with_pid=True) as log_writer:
            try:
                server = listen(settings, port, reuse_port=True)
            except ServerStartError as exc:
                log.error("%s", exc)
            else:
                os.write(ready_fd, b".")
                serve(server, log_writer, announce=False)  # the parent announces once all are up
                status = 0
    finally:
        os._exit(status)


def _wait_ready(ready_fd: int, count: int) -> bool:
    """Read one byte per worker from the ready pipe; False if they are not all up in time."""
    deadline = time.monotonic() + READY_SECONDS
    while count > 0:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([ready_fd], [], [], left)[0]:
            return False
        data = os.read(ready_fd, count)
        if not data:
            return False
        count -= len(data)
    return True


def _reap(pids: set[int]) -> list[tuple[int, int]]:
    """Collect every worker that has ended: (pid, wait status) pairs, removed from *pids*."""
    ended = []
    while pids:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if not pid:
            break
        if pid in pids:
            pids.discard(pid)
            ended.append((pid, status))
    return ended


def _stop_workers(pids: set[int], began: float) -> None:
    """SIGTERM every worker; SIGKILL what is left at the stop's LOG_DONE after *began*."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = began + LOG_DONE
    while True:
        _reap(pids)
        left = deadline - time.monotonic()
        if not pids or left <= 0:
            break
        signal.sigtimedwait({signal.SIGCHLD}, left)
    for pid in pids:
        log.warning("El proceso %d no terminó a tiempo; se mata", pid)
        _signal(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already exited: waitpid collects it
        os.kill(pid, signum)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"señal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"código {os.waitstatus_to_exitcode(status)}"


class _Supervisor:
    """The parent's state: the workers' pids, the ready pipe and recent restarts."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings, self.port = settings, port
        self.ready_read, self.ready_write = os.pipe()
        self.pids: set[int] = set()
        self.restarts: list[float] = []

    def start(self) -> None:
        self.pids.add(_start_worker(self.settings, self.port, self.ready_write))

    def supervise(self, log_writer: LogWriter) -> int:
        """Restart workers that die until a stop signal (0) or too many restarts (1)."""
        while True:
            signum = signal.sigwait(_PARENT_SIGNALS)
            if signum != signal.SIGCHLD:
                log_writer.stop_began = time.monotonic()
                log.info("Señal %s: parando %s", signal.Signals(signum).name,
                         plural(len(self.pids), "proceso", "procesos"))
                return 0
            for pid, status in _reap(self.pids):
                log.warning("El proceso %d terminó inesperadamente (%s); se arranca otro",
                            pid, _describe(status))
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
                if len(self.restarts) > MAX_RESTARTS:
                    log.error("Demasiados reinicios en %g s; el servidor se detiene",
                              RESTART_WINDOW)
                    return 1
                log_writer.flush(LOG_FLUSH_SECONDS)  # fork with our log thread idle, stderr free
                self.start()

    def close(self, began: float | None) -> None:
        _stop_workers(self.pids, time.monotonic() if began is None else began)
        os.close(self.ready_read)
        os.close(self.ready_write)


def run_workers(settings: Settings, limit_warning: str | None,
                on_ready: Callable[[int], None]) -> int:
    """Run ``settings.workers`` server processes on one port; return the exit status.

    *on_ready* gets the port once every worker listens (``--ready-fd``).

    Stop signals (and SIGCHLD) must be blocked already (serving.block_stop_signals): workers
    inherit the mask, so none is lost before their own serve() waits for it.
    """
    try:
        reservation = _reserve_port(settings)
    except OSError as exc:
        error = bind_error_message(exc, settings.host, settings.port)
        with background_logging(settings.log_level, exit_seconds=LOG_DONE) as log_writer:
            log.error("%s", error)
        return exit_status(1, log_writer)
    supervisor = _Supervisor(settings, reservation.getsockname()[1])
    with reservation:
        for _ in range(settings.workers):
            supervisor.start()
        with background_logging(settings.log_level, exit_seconds=LOG_DONE,
                                with_pid=True) as log_writer:
            if limit_warning:
                log.warning("%s", limit_warning)
            try:
                status = _serve_until_stopped(supervisor, reservation, log_writer, on_ready)
            finally:
                supervisor.close(log_writer.stop_began)
                log.info("Servidor parado")
    return exit_status(status, log_writer)


def _serve_until_stopped(supervisor: _Supervisor, reservation: socket.socket,
                         log_writer: LogWriter, on_ready: Callable[[int], None]) -> int:
    """Wait for the workers to listen, announce the address, supervise until stopped."""
    settings = supervisor.settings
    if not _wait_ready(supervisor.ready_read, settings.workers):
        log.error("Los procesos del servidor no arrancaron en %g s", READY_SECONDS)
        return 1
    log.info("Servidor escuchando en %s (%s, máximo %s cada uno)",
             format_address(reservation.getsockname()),
             plural(settings.workers, "proceso", "procesos"),
             plural(settings.max_clients, "cliente", "clientes"))
    on_ready(reservation.getsockname()[1])
    return supervisor.supervise(log_writer)
