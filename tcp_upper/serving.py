"""Process wiring for one server process: limits, runtime tuning, signals, serve until stopped.

Used by ``tcp-upper-server`` (:func:`tcp_upper.cli.server_main`) and by each ``--workers``
process (:mod:`tcp_upper.workers`). The stop's steps and budget are in
:mod:`tcp_upper.server.stop`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from . import config
from .errors import ServerStartError
from .logs import LogWriter
from .plural import plural
from .server import UpperServer, make_server
from .server import stop as server_stop
from .system import format_address, raise_open_file_limit

log = logging.getLogger("tcp_upper")

#: Signals that stop the server in order. Blocked in every thread and taken synchronously by
#: the main thread with sigwait(), so no library code can swallow or lose them. SIGHUP too: a
#: closed terminal or a supervisor's reload should not kill clients mid-reply.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

#: Stack reserved per client thread. The handler's call depth is shallow; the 8 MiB default
#: only inflates virtual memory at thousands of threads.
THREAD_STACK_BYTES = 512 * 1024

#: File descriptors kept for everything but clients (listening socket, logs, imports).
RESERVED_FDS = 64

#: How long a thread waiting for the GIL lets the holder run before asking it to let go
#: (CPython's default is 5 ms). Longer, so thousands of waiting threads do not take the CPUs
#: just asking for it (docs/OPERATIONS.md, "Thousands of threads").
SWITCH_INTERVAL_SECONDS = 0.2


def block_stop_signals() -> None:
    """Block the stop signals (and SIGCHLD, for --workers) in this thread and every later one.

    Call before any thread starts: a stop signal, a second Ctrl-C or a worker's SIGCHLD can
    then only be taken by sigwait() in the main thread.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {signal.SIGCHLD})


def raise_file_limit(max_clients: int) -> str | None:
    """Raise the open-file limit for *max_clients*; the warning to log if they cannot fit."""
    wanted = max_clients + RESERVED_FDS
    soft = raise_open_file_limit(wanted)
    if soft is None or soft >= wanted:
        return None
    return (f"El límite de ficheros abiertos ({soft}) no alcanza para "
            f"{plural(max_clients, 'cliente', 'clientes')}: se atenderán unos "
            f"{max(soft - RESERVED_FDS, 0)}; suba 'ulimit -n' o baje --max-clients")


def tune_runtime() -> None:
    """Process-wide settings for thousands of threads; called once, before serving."""
    threading.stack_size(THREAD_STACK_BYTES)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    # Objects alive at start-up never become garbage: keep full collections from re-scanning
    # them, so pauses grow with the clients' objects only.
    gc.collect()
    gc.freeze()


def serve(server: UpperServer, log_writer: LogWriter, announce: bool = True) -> None:
    """Serve until a stop signal, then stop in order (main thread, stop signals blocked).

    The accept loop runs in its own thread; the main thread waits for a stop signal. The
    listening line is logged at INFO when *announce* is true, at DEBUG otherwise (a worker:
    its parent announces).
    """
    server_stop.install_wake_handler()
    accept_loop = threading.Thread(target=server.serve_forever,
                                   args=(server_stop.ACCEPT_POLL_SECONDS,),
                                   name="accept", daemon=True)
    accept_loop.start()
    log.log(logging.INFO if announce else logging.DEBUG, "Servidor escuchando en %s (máximo %s)",
            format_address(server.server_address),
            plural(server.max_clients, "cliente", "clientes"))
    signum = signal.sigwait(STOP_SIGNALS)
    log_writer.stop_began = began = time.monotonic()
    log.info("Señal %s: parando; %s", signal.Signals(signum).name,
             plural(server.active_clients, "cliente conectado", "clientes conectados"))
    server_stop.stop_server(server, began)


def listen(settings: config.Settings, port: int | None = None,
           reuse_port: bool = False) -> UpperServer:
    """A server listening as *settings* say (on *port* if given); raises ServerStartError."""
    return make_server(
        settings.host,
        settings.port if port is None else port,
        max_clients=settings.max_clients,
        idle_timeout=settings.idle_timeout,
        write_timeout=settings.write_timeout,
        reuse_port=reuse_port,
        proxy_protocol=settings.proxy_protocol,
        trusted_proxies=settings.trusted_proxies,
    )


def ready_reporter(fd: int | None) -> Callable[[int], None]:
    """What to call with the bound port once connections are accepted: with ``--ready-fd``,
    write it to that inherited descriptor as ASCII decimal and a newline, then close it."""

    def report(port: int) -> None:
        if fd is not None:
            with contextlib.suppress(OSError):  # the reader is gone: it learns nothing more
                os.write(fd, b"%d\n" % port)
            with contextlib.suppress(OSError):
                os.close(fd)

    return report


def run_server(settings: config.Settings, log_writer: LogWriter,
               on_ready: Callable[[int], None]) -> int:
    """One server process: listen, serve until a stop signal; 1 if it cannot listen.

    *on_ready* gets the bound port once the socket listens (``--ready-fd``).
    """
    try:
        server = listen(settings)
    except ServerStartError as exc:
        log.error("%s", exc)
        return 1
    on_ready(server.server_address[1])
    serve(server, log_writer)
    return 0
