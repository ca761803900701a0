"""Command-line wiring: settings, logging, signals and process limits around the server.

Only this module touches ``sys.argv``, the environment, logging configuration and signal
handlers; ``server`` and ``protocol`` stay importable and testable without side effects.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Callable, TextIO

from . import __version__, config
from .errors import SettingsError
from .server import (
    UpperServer,
    bind_error_message,
    install_wake_handler,
    make_server,
)
from .system import format_address, raise_open_file_limit

log = logging.getLogger("tcp_upper")

#: Stack reserved per client thread. The handler's call depth is shallow; the 8 MiB default
#: only inflates virtual memory at thousands of threads.
THREAD_STACK_BYTES = 512 * 1024

#: File descriptors kept for everything but clients (listening socket, logs, imports).
RESERVED_FDS = 64

#: SIGTERM/SIGINT must end the process within 2 s of the signal: clients get up to
#: STOP_GRACE_SECONDS to leave in order, and the log lines still queued then get what is left
#: of STOP_BUDGET_SECONDS (LOG_FLUSH_SECONDS at least) to be written.
STOP_GRACE_SECONDS, STOP_BUDGET_SECONDS = 1.3, 1.8

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

#: Log lines waiting for the writer thread at most (about 100 bytes each); beyond it they are
#: dropped: stderr is stuck, or a storm of thousands of clients outpaces the writer.
LOG_QUEUE_LINES = 50_000
#: At exit, how long queued log lines may take to be written, at least.
LOG_FLUSH_SECONDS = 0.3

#: How long a thread waiting for the GIL lets the holder run before asking it to let go
#: (CPython's default is 5 ms). Every thread here gives the GIL up at each system call, so a
#: longer interval does not delay them (the compare.sh rows did not move); but each waiting
#: thread wakes once per interval, and when thousands wait at once (a connection storm,
#: everyone leaving together) those wake-ups take over the CPUs. 9,000 clients leaving as
#: SIGTERM lands: exit 27 s with 5 ms, 1.0-1.3 s with 0.2 s (tests/test_stress.py has the
#: 4,096-client case).
SWITCH_INTERVAL_SECONDS = 0.2


def build_parser(prog: str, description: str, names: tuple[str, ...]) -> argparse.ArgumentParser:
    """An argument parser with ``--version``, ``--env-file`` and a flag per setting."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    config.add_arguments(parser, names)
    return parser


def parse_settings(
    parser: argparse.ArgumentParser, names: tuple[str, ...], argv: list[str] | None
) -> config.Settings:
    """Parse *argv* and resolve settings; a bad one exits 2 with one line (argparse style)."""
    return settings_from(parser, names, parser.parse_args(argv))


def settings_from(
    parser: argparse.ArgumentParser, names: tuple[str, ...], args: argparse.Namespace
) -> config.Settings:
    """Resolve settings from parsed *args*; a bad one exits 2 with one line (argparse style)."""
    try:
        return config.load_settings(args, names)
    except SettingsError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
        raise  # unreachable: parser.exit raises SystemExit


def configure_logging(level: str) -> None:
    """One line per event on stderr, with a timestamp."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)


#: A log line waiting for the writer: when it was logged (time.time()) and its text without
#: the timestamp. The writer adds the timestamp: time.localtime()/strftime() in a client
#: thread touched deeper stack pages, about 3 KiB more RSS per client at 10,000 clients.
LogEntry = tuple[float, str]


class LogWriter(threading.Thread):
    """Writes queued log lines to *stream*, from one daemon thread, until it gets None.

    Whatever is queued goes out in one write(): when thousands of client threads want the GIL
    at once (a connection storm, everyone leaving together) this thread gets it rarely, so
    each turn must count. Lines look like :data:`LOG_FORMAT`'s.
    """

    def __init__(self, entries: queue.SimpleQueue[LogEntry | None], stream: TextIO) -> None:
        super().__init__(name="log-writer", daemon=True)
        self.entries, self.stream = entries, stream
        #: When the lines still queued at exit must be written by (time.monotonic()); set by
        #: serve() from the stop signal, so they get what the stop left of its budget.
        self.flush_deadline = float("-inf")

    def run(self) -> None:
        entries, stream = self.entries, self.stream
        second, date_and_time = -1, ""
        while True:
            batch = [entries.get()]
            with contextlib.suppress(queue.Empty):
                while batch[-1] is not None:
                    batch.append(entries.get_nowait())
            done = batch[-1] is None
            if done:
                batch.pop()
            lines = []
            for created, text in batch:  # logging's default %(asctime)s, its date once a second
                if int(created) != second:
                    second = int(created)
                    date_and_time = time.strftime(logging.Formatter.default_time_format,
                                                  logging.Formatter.converter(second))
                asctime = logging.Formatter.default_msec_format % (date_and_time,
                                                                    created % 1 * 1000)
                lines.append(f"{asctime} {text}\n")
            with contextlib.suppress(OSError, ValueError):  # stderr broken or closed: drop
                stream.write("".join(lines))
                stream.flush()
            if done:
                return


class _LineQueueHandler(logging.Handler):
    """Formats each record (but its timestamp) in the thread that logs it, and queues it for
    the writer.

    Never blocks: past :data:`LOG_QUEUE_LINES` waiting (nobody reads stderr, or the writer
    cannot keep up), lines are dropped and counted, so memory stays bounded and clients are
    served. A SimpleQueue takes no lock of its own for thousands of threads to fight over; the
    bound is checked first, so racing threads may pass it by a few lines.
    """

    def __init__(self, entries: queue.SimpleQueue[LogEntry | None], fmt: str) -> None:
        super().__init__()
        self.entries = entries
        self.setFormatter(logging.Formatter(fmt.replace("%(asctime)s ", "")))
        self.dropped = 0
        self._dropped_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if self.entries.qsize() < LOG_QUEUE_LINES:
            try:
                self.entries.put((record.created, self.format(record)))
            except Exception:  # a bad format string: logging's own policy (silent here)
                self.handleError(record)
        else:
            with self._dropped_lock:
                self.dropped += 1

    def report_dropped(self) -> None:
        """Queue one line (past the bound) saying how many were dropped, if any were."""
        if self.dropped:
            record = logging.makeLogRecord({
                "name": log.name, "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d líneas del registro se descartaron: se escribían más despacio de lo "
                       "que llegaban", "args": (self.dropped,)})
            self.entries.put((record.created, self.format(record)))


@contextlib.contextmanager
def background_logging(level: str, with_pid: bool = False) -> Iterator[LogWriter]:
    """Like :func:`configure_logging`, but stderr is written by one background thread.

    Client threads only format and queue their lines, so a log line never makes them give up
    the GIL for a write() (at thousands of clients, each hand-off is a wait). When the block
    ends, queued lines are written, waiting until the writer's ``flush_deadline`` or
    :data:`LOG_FLUSH_SECONDS`, whichever is later: a stderr that nobody reads must not keep the
    process alive. Lines dropped on the way are counted in one last line. With *with_pid*,
    lines show the process id. Yields the writer thread: still alive after the block means
    stderr is stuck.
    """
    fmt = LOG_FORMAT.replace("%(levelname)s", "%(levelname)s [%(process)d]") if with_pid else (
        LOG_FORMAT
    )
    entries: queue.SimpleQueue[LogEntry | None] = queue.SimpleQueue()
    queued = _LineQueueHandler(entries, fmt)
    logging.raiseExceptions = False  # a broken stderr must not print tracebacks to itself
    root = logging.getLogger()
    root.handlers = [queued]
    root.setLevel(level)
    thread = LogWriter(entries, sys.stderr)
    thread.start()
    try:
        yield thread
    finally:
        queued.report_dropped()
        deadline = max(time.monotonic() + LOG_FLUSH_SECONDS, thread.flush_deadline)
        entries.put(None)
        thread.join(max(0.0, deadline - time.monotonic()))


def check_open_file_limit(max_clients: int) -> None:
    """Raise the open-file limit for *max_clients*; warn if they cannot all fit under it."""
    wanted = max_clients + RESERVED_FDS
    soft = raise_open_file_limit(wanted)
    if soft is not None and soft < wanted:
        log.warning(
            "El límite de ficheros abiertos (%d) no alcanza para %d clientes: se atenderán unos "
            "%d; suba 'ulimit -n' o baje --max-clients",
            soft, max_clients, max(soft - RESERVED_FDS, 0),
        )


def tune_runtime() -> None:
    """Process-wide settings for thousands of threads; called once, before serving."""
    threading.stack_size(THREAD_STACK_BYTES)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    # Objects alive at start-up never become garbage: keep full collections from re-scanning
    # them, so pauses grow with the clients' objects only.
    gc.collect()
    gc.freeze()


#: Signals that stop the server. Blocked in every thread and taken synchronously by the main
#: thread with sigwait(), so no library code can swallow or lose them.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

#: How often the accept loop checks for shutdown(): part of the 2 s stop budget.
POLL_SECONDS = 0.1


def serve(server: UpperServer, log_writer: LogWriter, announce: bool = True) -> None:
    """Serve until SIGINT/SIGTERM, then close every client in order (main thread only).

    The accept loop runs in its own thread; the main thread waits for a stop signal. The
    listening line is logged at INFO when *announce* is true, at DEBUG otherwise. The lines
    still queued in *log_writer* after the stop may use what is left of the stop budget.
    """
    install_wake_handler()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited by every new thread
    accept_loop = threading.Thread(target=server.serve_forever, args=(POLL_SECONDS,),
                                   name="accept", daemon=True)
    accept_loop.start()
    log.log(logging.INFO if announce else logging.DEBUG,
            "Servidor escuchando en %s (máximo %d clientes)",
            format_address(server.server_address), server.max_clients)
    signum = signal.sigwait(STOP_SIGNALS)
    log_writer.flush_deadline = time.monotonic() + STOP_BUDGET_SECONDS
    log.info("Señal %s: parando; %d clientes conectados", signal.Signals(signum).name,
             server.active_clients)
    server.shutdown()
    unfinished = server.close_clients(STOP_GRACE_SECONDS)
    if unfinished:
        log.warning("%d clientes no terminaron a tiempo; se cierran", unfinished)
    server.server_close()
    log.info("Servidor parado")


def server_main(argv: list[str] | None = None) -> int:
    """``python -m tcp_upper.server``: returns the exit status (0 stopped, 1 cannot listen)."""
    parser = build_parser(
        "tcp-upper-server",
        "Servidor TCP que responde cada mensaje en mayúsculas; DESCONEXION cierra ese cliente.",
        config.SERVER_SETTINGS,
    )
    # Internal (tcp_upper.cluster): an inherited pipe that gets the bound port once listening.
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = settings_from(parser, config.SERVER_SETTINGS, args)
    # Before any thread starts, so every thread inherits the mask: a stop signal (or a second
    # Ctrl-C, or a worker's SIGCHLD) can then only be taken by sigwait() in the main thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {signal.SIGCHLD})
    with background_logging(settings.log_level, with_pid=settings.workers > 1) as log_writer:
        check_open_file_limit(settings.max_clients)
        tune_runtime()
        if settings.workers > 1:
            from .workers import run_workers

            status = run_workers(settings, on_ready=ready_reporter(args.ready_fd))
        else:
            status = run_server(settings, log_writer, ready_reporter(args.ready_fd))
    if log_writer.is_alive():  # nobody reads stderr: a normal exit would block flushing it
        os._exit(status)
    return status


def ready_reporter(fd: int | None) -> Callable[[int], None]:
    """What to call with the bound port once connections are accepted: with ``--ready-fd``,
    write it to that descriptor as ASCII decimal and a newline, then close it."""

    def report(port: int) -> None:
        if fd is not None:
            with contextlib.suppress(OSError):  # the reader is gone: it learns nothing more
                os.write(fd, b"%d\n" % port)
            with contextlib.suppress(OSError):
                os.close(fd)

    return report


def run_server(settings: config.Settings, log_writer: LogWriter,
               on_ready: Callable[[int], None] | None = None) -> int:
    """One server process: listen, serve until a stop signal; 1 if it cannot listen.

    *on_ready* gets the bound port once the socket listens (``--ready-fd``).
    """
    try:
        server = make_server(
            settings.host,
            settings.port,
            max_clients=settings.max_clients,
            idle_timeout=settings.idle_timeout,
            write_timeout=settings.write_timeout,
            proxy_protocol=settings.proxy_protocol,
            trusted_proxies=settings.trusted_proxies,
        )
    except OSError as exc:
        log.error("%s", bind_error_message(exc, settings.host, settings.port))
        return 1
    if on_ready is not None:
        on_ready(server.server_address[1])
    serve(server, log_writer)
    return 0


def client_main(argv: list[str] | None = None) -> int:
    """``python -m tcp_upper.client``: see ``tcp_upper.client.run_session``."""
    from .client import run_session

    parser = build_parser(
        "tcp-upper-client",
        "Cliente del servidor de mayúsculas: envía cada línea que escriba y muestra la "
        "respuesta; DESCONEXION (o Ctrl-D) termina.",
        config.CLIENT_SETTINGS,
    )
    settings = parse_settings(parser, config.CLIENT_SETTINGS, argv)
    configure_logging(settings.log_level)
    return run_session(settings.host, settings.port, settings.timeout)

