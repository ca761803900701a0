"""UpperServer: the ``ThreadingTCPServer`` that admits clients and keeps the set of open ones.

Admission (``max_clients``, out of descriptors or threads) and the bookkeeping the stop needs
live here; the stop's steps and timings are in :mod:`.stop`.
"""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
import threading
import time
from typing import Any, Callable

from ..config import Settings
from ..errors import ServerStartError
from ..plural import plural
from ..proxy_protocol import Network
from ..system import format_address, listen_address
from . import stop
from .handler import Reason, UpperHandler
from .sockets import refuse

log = logging.getLogger("tcp_upper.server")

#: Listen backlog: absorbs a burst of thousands of connects (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 4096

#: How long the accept loop pauses when the process is out of file descriptors, and how often
#: at most it says so in the log.
ACCEPT_PAUSE_SECONDS, ACCEPT_WARNING_SECONDS = 0.1, 10.0

FULL_MESSAGE = "ERROR servidor lleno ({clients}); inténtelo más tarde\n"
NO_THREAD_MESSAGE = "ERROR servidor sin recursos para más clientes; inténtelo más tarde\n"


class UpperServer(socketserver.ThreadingTCPServer):
    """A thread-per-client TCP server for the upper-case protocol.

    Instance attributes ``max_clients``, ``idle_timeout`` and ``write_timeout`` may be set
    before :meth:`serve_forever` (defaults: :class:`tcp_upper.config.Settings`);
    ``server_address`` holds the real bound address (port 0 works).
    """

    allow_reuse_address = True  # restart at once on the same port, despite TIME_WAIT
    daemon_threads = True  # client threads never keep the process alive
    block_on_close = False  # and are not collected into a list that grows with every accept
    request_queue_size = LISTEN_BACKLOG

    allow_reuse_port = False  # set by make_server for --workers

    max_clients: int = Settings.max_clients
    idle_timeout: float | None = Settings.idle_timeout
    write_timeout: float = Settings.write_timeout
    #: --proxy-protocol: every connection must start with a PROXY header from a trusted peer.
    proxy_protocol: bool = Settings.proxy_protocol
    trusted_proxies: tuple[Network, ...] = Settings.trusted_proxies
    _accept_warned_at = float("-inf")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Everything below is guarded by _clients_lock.
        # Open client sockets -> the handler serving each (None until its thread runs).
        self._clients: dict[socket.socket, UpperHandler | None] = {}
        # Sockets close_clients() half-closed itself: the process need not wait for them.
        self._ended_by_stop: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        self._all_gone = threading.Condition(self._clients_lock)
        #: Set once by close_clients(); handler threads read it without the lock.
        self.stopping = False
        super().__init__(*args, **kwargs)

    @property
    def active_clients(self) -> int:
        """How many client connections are open now."""
        return len(self._clients)

    def server_bind(self) -> None:
        if self.allow_reuse_port:  # socketserver sets it itself only from Python 3.11 on
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; when out of file descriptors, pause accepting briefly.

        The pending connection stays readable on the listening socket, so retrying at once
        would spin a CPU; waiting lets clients leave and free descriptors (nginx does the same).
        """
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                now = time.monotonic()
                if now - self._accept_warned_at >= ACCEPT_WARNING_SECONDS:
                    self._accept_warned_at = now
                    log.warning("No se pueden aceptar más conexiones (%s): se reintenta cada "
                                "%g s; suba 'ulimit -n' o baje --max-clients", exc.strerror,
                                ACCEPT_PAUSE_SECONDS)
                time.sleep(ACCEPT_PAUSE_SECONDS)
            raise

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the client if there is room; otherwise answer one ERROR line (then closed)."""
        with self._clients_lock:
            if len(self._clients) < self.max_clients and not self.stopping:
                self._clients[request] = None
                return True
        clients = plural(self.max_clients, "cliente", "clientes")
        log.warning("Servidor lleno (%s): rechazado %s", clients, format_address(client_address))
        refuse(request, FULL_MESSAGE.format(clients=clients))
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the client's thread; if none can be started, refuse it with an ERROR line."""
        try:
            super().process_request(request, client_address)
        except RuntimeError as exc:  # "can't start new thread": memory or thread limits
            log.warning("No se puede crear un hilo (%s): rechazado %s", exc,
                        format_address(client_address))
            refuse(request, NO_THREAD_MESSAGE)
            self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self._clients_lock:  # forget it first: close_clients() never sees a closed socket
            self._clients.pop(request, None)
            self._ended_by_stop.discard(request)
            if self.stopping or not self._clients:
                self._all_gone.notify_all()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A bug, not a client's doing (those are handled in the handler): log it with its trace."""
        log.exception("Error inesperado con el cliente %s", format_address(client_address))

    def attach(self, handler: UpperHandler) -> None:
        """Record the handler serving a client (from its setup, in its thread); if the server
        is already stopping, its socket gets the stop timeouts, so its first recv() ends it."""
        with self._clients_lock:
            self._clients[handler.connection] = handler
            if self.stopping:
                stop.set_stop_timeouts(handler.connection)

    def mark_reported(self, handler: UpperHandler) -> bool:
        """True the first time for *handler*: one disconnect line per client, logged either by
        its thread or by close_clients(), never both."""
        with self._clients_lock:
            first, handler.reported = not handler.reported, True
            return first

    def close_clients(self, timeout: float) -> int:
        """Stop admitting clients and end every connection in order (step 2 of :mod:`.stop`).

        Waits up to *timeout* seconds; returns how many clients were still being served then
        (0: all ended in order). Needs :func:`.stop.install_wake_handler` (main thread) first.
        """
        quiet_since = time.monotonic() - stop.IDLE_QUIET_SECONDS
        with self._clients_lock:
            self.stopping = True
            for request, handler in self._clients.items():
                if handler is not None and stop.is_quiet(handler, quiet_since):
                    stop.end_quiet(request)
                    self._ended_by_stop.add(request)
                    handler.reported = True
                    log.info("Cliente %s desconectado: %s", handler.peer, Reason.STOPPING)
                else:
                    stop.wake(request, handler.thread if handler is not None else None)
            self._all_gone.wait_for(lambda: self._clients.keys() <= self._ended_by_stop,
                                    max(0.0, timeout))
            unfinished = [handler for request, handler in self._clients.items()
                          if request not in self._ended_by_stop]
            for handler in unfinished:  # the process ends without them: say so, once each
                if handler is not None and not handler.reported:
                    handler.reported = True
                    log.info("Cliente %s desconectado: %s", handler.peer, Reason.STOP_LATE)
            return len(unfinished)


class UpperServer6(UpperServer):
    """The same server on an IPv6 socket (``--host ::`` also accepts IPv4 where mapped)."""

    address_family = socket.AF_INET6


def make_server(
    host: str,
    port: int,
    *,
    max_clients: int = UpperServer.max_clients,
    idle_timeout: float | None = UpperServer.idle_timeout,
    write_timeout: float = UpperServer.write_timeout,
    reuse_port: bool = False,
    handler: Callable[..., socketserver.BaseRequestHandler] = UpperHandler,
    proxy_protocol: bool = UpperServer.proxy_protocol,
    trusted_proxies: tuple[Network, ...] = UpperServer.trusted_proxies,
) -> UpperServer:
    """Bind a server to the first address *host* resolves to; it is listening when returned.

    Raises :class:`~tcp_upper.errors.ServerStartError` (an ``OSError``) whose message says
    why and what to do, e.g. when the port is in use.
    """
    try:
        family, address = listen_address(host, port)
        server_class = UpperServer6 if family == socket.AF_INET6 else UpperServer
        server = server_class(address, handler, bind_and_activate=False)
    except OSError as exc:
        raise ServerStartError(bind_error_message(exc, host, port)) from exc
    server.max_clients = max_clients
    server.idle_timeout = idle_timeout
    server.write_timeout = write_timeout
    server.allow_reuse_port = reuse_port
    server.proxy_protocol, server.trusted_proxies = proxy_protocol, trusted_proxies
    try:
        server.server_bind()
        server.server_activate()
    except OSError as exc:
        server.server_close()
        raise ServerStartError(bind_error_message(exc, host, port)) from exc
    except BaseException:
        server.server_close()
        raise
    return server


def bind_error_message(exc: OSError, host: str, port: int) -> str:
    """One line for a person: why the server cannot listen on host:port and what to do."""
    where = format_address((host, port))
    if exc.errno == errno.EADDRINUSE:
        return (f"El puerto {port} ya está en uso ({where}): pare el otro proceso o elija otro "
                "puerto con --port N, TCP_UPPER_PORT o config.env (0 = uno libre)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"Sin permiso para escuchar en {where}: use un puerto mayor que 1023 "
                "con --port N")
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return (f"No se puede escuchar en {where}: la dirección {host!r} no es de esta máquina "
                "o no se resuelve; pruebe --host localhost")
    return f"No se puede escuchar en {where}: {exc.strerror or exc}"
