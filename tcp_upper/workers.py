"""``--workers N``: N server processes sharing one port, supervised by the parent.

Each worker is a forked child running the ordinary threaded server on its own listening socket
with ``SO_REUSEPORT``; the kernel spreads new connections over them, so N processes use N cores
despite the GIL. The parent only supervises: it reserves the port (port 0 becomes a real one
before any worker starts), restarts a worker that dies, and on SIGINT/SIGTERM stops them all.
``max_clients`` applies to each worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from typing import Callable

from .config import Settings
from .server import bind_error_message, make_server
from .system import format_address, listen_address

log = logging.getLogger(__name__)

#: How long the parent waits for every worker to be listening.
READY_SECONDS = 10.0
#: Workers get this long to close their clients in order before they are killed (< 2 s).
STOP_SECONDS = 1.8
#: More restarts than this within RESTART_WINDOW seconds means the workers cannot run: give up.
MAX_RESTARTS, RESTART_WINDOW = 5, 10.0


#: What the parent waits for: a stop request, or a worker that ended.
_PARENT_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGCHLD})


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


def _start_worker(settings: Settings, port: int, ready_fd: int) -> int:
    """Fork one worker; the child serves until signalled and never returns here."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        from .cli import background_logging, serve

        # The parent's log-writing thread does not exist in this process: start our own.
        with background_logging(settings.log_level, with_pid=True) as log_writer:
            try:
                server = make_server(
                    settings.host, port, max_clients=settings.max_clients,
                    idle_timeout=settings.idle_timeout, write_timeout=settings.write_timeout,
                    reuse_port=True, proxy_protocol=settings.proxy_protocol,
                    trusted_proxies=settings.trusted_proxies,
                )
            except OSError as exc:
                log.error("%s", bind_error_message(exc, settings.host, port))
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


def _stop_workers(pids: set[int]) -> None:
    """SIGTERM every worker, wait for them (bounded), SIGKILL what is left."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
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


def run_workers(settings: Settings, on_ready: Callable[[int], None] | None = None) -> int:
    """Run ``settings.workers`` server processes on one port; return the exit status.

    *on_ready* gets the port once every worker listens (``--ready-fd``).
    """
    try:
        reservation = _reserve_port(settings)
    except OSError as exc:
        log.error("%s", bind_error_message(exc, settings.host, settings.port))
        return 1
    address = reservation.getsockname()
    port = address[1]
    ready_read, ready_write = os.pipe()
    pids: set[int] = set()
    restarts: list[float] = []
    # Blocked before forking, so signals are taken synchronously here (and workers inherit the
    # mask until their own serve() waits for SIGINT/SIGTERM: none is lost in between).
    signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
    try:
        for _ in range(settings.workers):
            pids.add(_start_worker(settings, port, ready_write))
        if not _wait_ready(ready_read, settings.workers):
            log.error("Los procesos del servidor no arrancaron en %g s", READY_SECONDS)
            return 1
        log.info("Servidor escuchando en %s (%d procesos, máximo %d clientes cada uno)",
                 format_address(address), settings.workers, settings.max_clients)
        if on_ready is not None:
            on_ready(port)
        while True:
            signum = signal.sigwait(_PARENT_SIGNALS)
            if signum != signal.SIGCHLD:
                log.info("Señal %s: parando %d procesos", signal.Signals(signum).name, len(pids))
                return 0
            for pid, status in _reap(pids):
                log.warning("El proceso %d terminó inesperadamente (%s); se arranca otro",
                            pid, _describe(status))
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
                if len(restarts) > MAX_RESTARTS:
                    log.error("Demasiados reinicios en %g s; el servidor se detiene",
                              RESTART_WINDOW)
                    return 1
                pids.add(_start_worker(settings, port, ready_write))
    finally:
        _stop_workers(pids)
        reservation.close()
        os.close(ready_read)
        os.close(ready_write)
        log.info("Servidor parado")


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"señal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"código {os.waitstatus_to_exitcode(status)}"
