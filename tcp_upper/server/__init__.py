"""The threaded server: one thread per client, moving bytes between its socket and the protocol.

Configured the ``socketserver`` way, with class attributes and hooks:

- :class:`UpperServer` (a ``ThreadingTCPServer``) accepts, enforces ``max_clients`` in
  ``verify_request`` and keeps the set of open connections so it can close them in order when
  it stops;
- :class:`UpperHandler` (a ``StreamRequestHandler``) runs the read → feed → send loop.

Timeouts are kernel socket options (``SO_RCVTIMEO``/``SO_SNDTIMEO``) on a blocking socket, so
every read and write is a single system call; an expired timeout surfaces as
``BlockingIOError``. Nothing here reads settings files: ``tcp_upper.cli.server_main``
wires settings, logging and signals together.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import signal
import socket
import socketserver
import struct
import threading
import time
from typing import Any, Callable

from ..protocol import HOLD_BACK_SECONDS, UpperProtocol
from ..proxy_protocol import DEFAULT_TRUSTED_PROXIES, Network
from ..system import format_address, listen_address
from .proxy import REFUSED_DRAIN_SECONDS, accept_proxied

log = logging.getLogger(__name__)

#: Bytes asked of each recv(): large enough for bulk transfers in few calls; replies go out per
#: chunk, so memory per connection is bounded by it whatever the line length.
READ_SIZE = 64 * 1024

#: Listen backlog: absorbs a burst of thousands of connects (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 4096

#: After DESCONEXION (or an idle timeout) the server half-closes and discards what the client
#: still sends for at most this long, so a client still writing sees end of stream, not a reset.
DRAIN_SECONDS = 1.0

#: Keepalive: probe a silent peer after a minute, give up after 5 unanswered probes 10 s apart.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 10, 5

#: How long the accept loop pauses when the process is out of file descriptors, and how often
#: at most it says so in the log.
ACCEPT_PAUSE_SECONDS, ACCEPT_WARNING_SECONDS = 0.1, 10.0

#: Sent by close_clients() to each client thread to interrupt a blocked recv()/send(): the
#: retried call then sees the short timeouts set just before, and the handler ends in order.
WAKE_SIGNAL = signal.SIGUSR1

#: A client that sent nothing for this long is taken as idle when the server stops: it gets
#: its end of stream without waking its thread (a client still talking may have replies
#: unread, which a reset at exit would destroy; its thread drains before closing).
QUIET_SECONDS = 0.25

#: When stopping: how soon a thread blocked in recv() gives up, and how long a final send()
#: may wait for a slow reader.
STOP_RECV_SECONDS, STOP_SEND_SECONDS = 0.001, 0.5

#: When stopping, a client still talking is answered until it has been silent for
#: STOP_QUIET_SECONDS (its kernel sends what it queued as soon as the server reads), for
#: STOP_ANSWER_SECONDS at most (a client that never stops talking).
STOP_QUIET_SECONDS, STOP_ANSWER_SECONDS = 0.02, 0.5

#: The drain after the half-close, when stopping: short, so that thousands of client threads
#: are done well before the 2 s stop deadline and leave the main thread the GIL to exit.
STOP_DRAIN_SECONDS = 0.3

FULL_MESSAGE = "ERROR servidor lleno ({limit} clientes); inténtelo más tarde\n"
NO_THREAD_MESSAGE = "ERROR servidor sin recursos para más clientes; inténtelo más tarde\n"


class Reason:
    """Why a client connection ended, as written in the log."""

    COMMAND = "DESCONEXION"
    EOF = "fin del flujo"
    RESET = "conexión reiniciada por el cliente"
    IDLE = "inactivo {seconds:g} s"
    STALLED = "no lee sus respuestas desde hace {seconds:g} s"
    STOPPING = "parada del servidor"
    STOP_LATE = "parada del servidor (no terminó a tiempo; se corta)"


def _set_timeout(sock: socket.socket, option: int, seconds: float | None) -> None:
    """Set a kernel send/receive timeout; ``None`` blocks forever."""
    if seconds is None:
        sec, usec = 0, 0
    else:
        sec, usec = int(seconds), max(1, int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", sec, usec))


def _enable_keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _all_sent(sock: socket.socket) -> bool:
    """True when the kernel holds no reply bytes the client has not acknowledged yet
    (``TIOCOUTQ``, alias SIOCOUTQ; False where the system cannot tell, or the socket is closed).

    Only then may the process exit without this connection's thread: closing a socket with
    replies still queued would lose them if the client sends anything meanwhile (reset).
    """
    try:
        import fcntl
        import termios

        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (ImportError, AttributeError, OSError, ValueError):
        return False
    return struct.unpack("@i", raw)[0] == 0


def _refuse(request: socket.socket, message: str) -> None:
    """Send a refused client its ERROR line without blocking (the caller then closes it)."""
    with contextlib.suppress(OSError):  # it left already
        request.send(message.encode(), socket.MSG_DONTWAIT)


class UpperHandler(socketserver.StreamRequestHandler):
    """Serves one client: read a chunk, feed the protocol, send the reply, until it ends."""

    disable_nagle_algorithm = True  # replies are small and must not wait for an ACK
    rbufsize = 0  # reads go straight to recv(): no buffer to fill, no line to wait for
    server: UpperServer
    log_level = logging.INFO  # of its connect/disconnect lines (DEBUG: a proxy health check)

    def setup(self) -> None:
        super().setup()
        _enable_keepalive(self.connection)
        _set_timeout(self.connection, socket.SO_SNDTIMEO, self.server.write_timeout)
        _set_timeout(self.connection, socket.SO_RCVTIMEO, self.server.idle_timeout)
        self.peer = format_address(self.client_address)
        self.thread = threading.get_ident()
        #: True while blocked in recv() owing the client nothing: close_clients() can then end
        #: the connection from the main thread, without waking this one.
        self.waiting_idle = False
        self.reported = False  # whether its disconnect line was logged (see mark_reported)
        self.last_read = time.monotonic()  # when recv() last returned (see QUIET_SECONDS)
        self.server.attach(self)

    def handle(self) -> None:
        if self.server.proxy_protocol and not accept_proxied(self):  # PROXY header: proxy.py
            self._close_orderly(REFUSED_DRAIN_SECONDS)
            return
        log.log(self.log_level, "Cliente %s conectado (%d activos)", self.peer,
                self.server.active_clients)
        try:
            reason = self._serve()
        except BlockingIOError:  # SO_SNDTIMEO expired: the client stopped reading
            reason = Reason.STOPPING if self.server.stopping else Reason.STALLED.format(
                seconds=self.server.write_timeout)
        except (ConnectionResetError, BrokenPipeError):
            reason = Reason.STOPPING if self.server.stopping else Reason.RESET
        except OSError as exc:
            reason = f"error de red: {exc.strerror or exc}"
        if self.server.mark_reported(self):
            log.log(self.log_level, "Cliente %s desconectado: %s", self.peer, reason)

    def _serve(self) -> str:
        """Run the read → feed → send loop; return why it ended.

        This loop is the per-message cost of the server: methods are bound to locals and the
        DEBUG lines are skipped without a call when DEBUG is off.
        """
        sock, server = self.connection, self.server
        recv, sendall = sock.recv, sock.sendall
        protocol = UpperProtocol()
        feed = protocol.feed
        monotonic = time.monotonic
        debug = log.isEnabledFor(logging.DEBUG)
        holding = False  # whether SO_RCVTIMEO is set to the hold-back pause
        while True:
            self.waiting_idle = not holding
            try:
                data = recv(READ_SIZE)
            except BlockingIOError:  # SO_RCVTIMEO expired, or close_clients() woke us
                data = None
            self.waiting_idle = False
            self.last_read = monotonic()
            if data is None:
                if server.stopping:
                    break
                if not holding:
                    self._close_orderly()
                    return Reason.IDLE.format(seconds=server.idle_timeout)
                reply, close = protocol.settle()
            elif not data:
                reply, close = protocol.feed_eof()
                if reply:
                    sendall(reply)
                if server.stopping:
                    return Reason.STOPPING
                return Reason.COMMAND if protocol.command_seen else Reason.EOF
            else:
                reply, close = feed(data)
                if debug:
                    log.debug("Cliente %s: %d bytes recibidos, %d enviados", self.peer,
                              len(data), len(reply))
            if reply:
                sendall(reply)
            if close:
                self._close_orderly()
                return Reason.COMMAND
            if server.stopping:  # a client that keeps talking is never idle in recv()
                break
            if protocol.holding is not holding:
                holding = protocol.holding
                _set_timeout(sock, socket.SO_RCVTIMEO,
                             HOLD_BACK_SECONDS if holding else server.idle_timeout)
                if server.stopping:  # close_clients() may have set its timeout just before
                    break
        # The server is stopping. What the client sent before that is owed a reply, including
        # bytes still on their way: a client's kernel holds back what did not fit in this
        # socket's receive queue and sends it as soon as this thread reads. So answer until the
        # client has been silent a moment (bounded, for one that never stops talking), then
        # close like after DESCONEXION; what arrives after the half-close is discarded.
        deadline = monotonic() + STOP_ANSWER_SECONDS
        readable = select.poll()
        readable.register(sock, select.POLLIN)
        while monotonic() < deadline and readable.poll(STOP_QUIET_SECONDS * 1000):
            try:
                data = recv(READ_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if not data:
                break
            reply, close = feed(data)
            if reply:
                sendall(reply)
            if close:
                self._close_orderly(STOP_DRAIN_SECONDS)
                return Reason.COMMAND
        reply, close = protocol.feed_eof()
        if reply:
            sendall(reply)
        self._close_orderly(STOP_DRAIN_SECONDS)
        return Reason.STOPPING

    def _close_orderly(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Half-close, then discard what the client still sends for a bounded time.

        Closing with unread bytes in the receive queue makes the kernel send a reset, which can
        destroy replies the client has not read yet; reading until its end of stream avoids it.
        """
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the client reset meanwhile (ENOTCONN): nothing left to drain
            return
        deadline = time.monotonic() + drain_seconds
        while (left := deadline - time.monotonic()) > 0:
            _set_timeout(sock, socket.SO_RCVTIMEO, left)
            try:
                if not sock.recv(READ_SIZE):
                    return
            except OSError:  # timed out, or reset: nothing more to wait for
                return


class UpperServer(socketserver.ThreadingTCPServer):
    """A thread-per-client TCP server for the upper-case protocol.

    Instance attributes ``max_clients``, ``idle_timeout`` and ``write_timeout`` may be set
    before :meth:`serve_forever`; ``server_address`` holds the real bound address (port 0 works).
    """

    allow_reuse_address = True  # restart at once on the same port, despite TIME_WAIT
    daemon_threads = True  # client threads never keep the process alive
    block_on_close = False  # and are not collected into a list that grows with every accept
    request_queue_size = LISTEN_BACKLOG

    allow_reuse_port = False  # set by make_server for --workers

    max_clients: int = 10_000
    idle_timeout: float | None = None
    #: --proxy-protocol: every connection must start with a PROXY header from a trusted peer.
    proxy_protocol = False
    trusted_proxies: tuple[Network, ...] = DEFAULT_TRUSTED_PROXIES
    _accept_warned_at = float("-inf")
    write_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Open client sockets -> the handler serving each (None until its thread runs).
        self._clients: dict[socket.socket, UpperHandler | None] = {}
        # Sockets close_clients() half-closed itself: the process need not wait for them.
        self._ended_by_stop: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        self._all_gone = threading.Condition(self._clients_lock)
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
        log.warning("Servidor lleno (%d clientes): rechazado %s", self.max_clients,
                    format_address(client_address))
        _refuse(request, FULL_MESSAGE.format(limit=self.max_clients))
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the client's thread; if none can be started, refuse it with an ERROR line."""
        try:
            super().process_request(request, client_address)
        except RuntimeError as exc:  # "can't start new thread": memory or thread limits
            log.warning("No se puede crear un hilo (%s): rechazado %s", exc,
                        format_address(client_address))
            _refuse(request, NO_THREAD_MESSAGE)
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
        """Record the handler serving a client (called from its setup, in its thread).

        If the server is already stopping, the socket gets the stop timeouts at once, so the
        handler's first recv() ends it.
        """
        with self._clients_lock:
            self._clients[handler.connection] = handler
            if self.stopping:
                self._set_stop_timeouts(handler.connection)

    def mark_reported(self, handler: UpperHandler) -> bool:
        """True the first time for *handler*: one disconnect line per client, logged either by
        its thread or by close_clients(), never both."""
        with self._clients_lock:
            first, handler.reported = not handler.reported, True
            return first

    def close_clients(self, timeout: float) -> int:
        """Stop admitting clients, end every connection in order, wait up to *timeout* s.

        A client that is owed nothing and quiet (its thread blocked in recv(), nothing read
        for :data:`QUIET_SECONDS`, every reply acknowledged) gets its end of stream from here,
        with a half-close; its thread wakes only if the client closes, and the process need
        not wait for it. Every other client thread is interrupted with
        :data:`WAKE_SIGNAL` after its socket got short timeouts: its recv() or send() ends, and
        it sends what it owes, half-closes and drains like after DESCONEXION. Waking only those
        keeps thousands of idle threads from fighting over the GIL at once. Needs
        :func:`install_wake_handler` (main thread) first. Returns how many clients were still
        being served when *timeout* ran out (0: all ended in order).
        """
        quiet_since = time.monotonic() - QUIET_SECONDS
        with self._clients_lock:
            self.stopping = True
            for request, handler in self._clients.items():
                if (handler is not None and handler.waiting_idle
                        and handler.last_read < quiet_since and _all_sent(request)):
                    with contextlib.suppress(OSError):  # the client left meanwhile
                        request.shutdown(socket.SHUT_WR)
                    self._ended_by_stop.add(request)
                    handler.reported = True
                    log.info("Cliente %s desconectado: %s", handler.peer, Reason.STOPPING)
                    continue
                self._set_stop_timeouts(request)
                if handler is not None:
                    signal.pthread_kill(handler.thread, WAKE_SIGNAL)
            self._all_gone.wait_for(lambda: self._clients.keys() <= self._ended_by_stop, timeout)
            unfinished = [handler for request, handler in self._clients.items()
                          if request not in self._ended_by_stop]
            for handler in unfinished:  # the process ends without them: say so, once each
                if handler is not None and not handler.reported:
                    handler.reported = True
                    log.info("Cliente %s desconectado: %s", handler.peer, Reason.STOP_LATE)
            return len(unfinished)

    @staticmethod
    def _set_stop_timeouts(request: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed by its handler
            _set_timeout(request, socket.SO_RCVTIMEO, STOP_RECV_SECONDS)
            _set_timeout(request, socket.SO_SNDTIMEO, STOP_SEND_SECONDS)


def install_wake_handler() -> None:
    """Install the no-op handler that lets :data:`WAKE_SIGNAL` interrupt system calls.

    Call once from the main thread before :meth:`UpperServer.close_clients`; with the default
    disposition the signal would end the process, and an ignored one interrupts nothing.
    """
    signal.signal(WAKE_SIGNAL, lambda signum, frame: None)


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
    proxy_protocol: bool = False,
    trusted_proxies: tuple[Network, ...] = DEFAULT_TRUSTED_PROXIES,
) -> UpperServer:
    """Bind a server to the first address *host* resolves to; it is listening when returned.

    Raises ``OSError`` from resolving or binding (e.g. ``EADDRINUSE``).
    """
    family, address = listen_address(host, port)
    server_class = UpperServer6 if family == socket.AF_INET6 else UpperServer
    server = server_class(address, handler, bind_and_activate=False)
    server.max_clients = max_clients
    server.idle_timeout = idle_timeout
    server.write_timeout = write_timeout
    server.allow_reuse_port = reuse_port
    server.proxy_protocol, server.trusted_proxies = proxy_protocol, trusted_proxies
    try:
        server.server_bind()
        server.server_activate()
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
