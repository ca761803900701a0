"""UpperHandler: serves one client in its own thread, read → feed the protocol → send."""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from typing import TYPE_CHECKING

from ..plural import plural
from ..protocol import HOLD_BACK_SECONDS, UpperProtocol
from ..system import format_address
from . import stop
from .proxy import REFUSED_DRAIN_SECONDS, accept_proxied
from .sockets import READ_SIZE, close_orderly, enable_keepalive, set_timeout

if TYPE_CHECKING:
    from .threaded import UpperServer

#: One logger for the whole server package: operators and tests filter on it.
log = logging.getLogger("tcp_upper.server")

#: After DESCONEXION (or an idle timeout) the server half-closes and discards what the client
#: still sends for at most this long, so a client still writing sees end of stream, not a reset.
ORDERLY_DRAIN_SECONDS = 1.0

#: After sending a reply this large, the thread gives the CPU away (os.sched_yield, without the
#: GIL): a thread woken for another client takes the GIL now instead of after a streaming
#: client's next chunks. A GIL released around recv()/send() is usually taken back by the
#: same busy thread before the woken one runs; see docs/TAIL_LATENCY.md.
YIELD_BYTES = 16 * 1024


class Reason:
    """Why a client connection ended, as written in the log."""

    COMMAND = "DESCONEXION"
    EOF = "fin del flujo"
    RESET = "conexión reiniciada por el cliente"
    IDLE = "inactivo {seconds:g} s"
    STALLED = "no lee sus respuestas desde hace {seconds:g} s"
    STOPPING = "parada del servidor"
    STOP_LATE = "parada del servidor (no terminó a tiempo; se corta)"


class UpperHandler(socketserver.StreamRequestHandler):
    """Serves one client: read a chunk, feed the protocol, send the reply, until it ends."""

    disable_nagle_algorithm = True  # replies are small and must not wait for an ACK
    rbufsize = 0  # reads go straight to recv(): no buffer to fill, no line to wait for
    server: UpperServer

    # Read by the thread that stops the server (see stop.is_quiet); written only by this
    # handler's thread, without a lock: one attribute store is atomic under the GIL.
    #: True while blocked in recv() owing the client nothing.
    waiting_idle = False
    #: time.monotonic() when recv() last returned.
    last_read = 0.0
    #: Whether this client's disconnect line was logged; only touched under the server's lock
    #: (see UpperServer.mark_reported): one line per client, from its thread or the stopper.
    reported = False
    #: Level of its connect/disconnect lines: DEBUG for a proxy's health check (LOCAL).
    log_level = logging.INFO

    def setup(self) -> None:
        super().setup()
        enable_keepalive(self.connection)
        set_timeout(self.connection, socket.SO_SNDTIMEO, self.server.write_timeout)
        set_timeout(self.connection, socket.SO_RCVTIMEO, self.server.idle_timeout)
        self.peer = format_address(self.client_address)
        self.thread = threading.get_ident()
        self.last_read = time.monotonic()
        self.server.attach(self)

    def handle(self) -> None:
        if self.server.proxy_protocol and not accept_proxied(self):  # PROXY header: proxy.py
            close_orderly(self.connection, REFUSED_DRAIN_SECONDS)
            return
        log.log(self.log_level, "Cliente %s conectado (%s)", self.peer,
                plural(self.server.active_clients, "activo", "activos"))
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
        sched_yield = os.sched_yield
        debug = log.isEnabledFor(logging.DEBUG)
        holding = False  # whether SO_RCVTIMEO is set to the hold-back pause
        while not server.stopping:  # checked after every change of SO_RCVTIMEO, too
            self.waiting_idle = not holding
            try:
                data = recv(READ_SIZE)
            except BlockingIOError:  # SO_RCVTIMEO expired, or the stop woke us
                data = None
            self.waiting_idle = False
            self.last_read = monotonic()
            if data is None:
                if server.stopping:
                    break
                if not holding:
                    close_orderly(sock, ORDERLY_DRAIN_SECONDS)
                    return Reason.IDLE.format(seconds=server.idle_timeout)
                reply, close = protocol.settle()
            elif not data:
                return self._end_of_stream(protocol)
            else:
                reply, close = feed(data)
                if debug:
                    log.debug("Cliente %s: %d bytes recibidos, %d enviados", self.peer,
                              len(data), len(reply))
            if reply:
                sendall(reply)
                if len(reply) >= YIELD_BYTES:
                    sched_yield()
            if close:
                close_orderly(sock, ORDERLY_DRAIN_SECONDS)
                return Reason.COMMAND
            if protocol.holding is not holding:
                holding = protocol.holding
                set_timeout(sock, socket.SO_RCVTIMEO,
                            HOLD_BACK_SECONDS if holding else server.idle_timeout)
        return Reason.COMMAND if stop.finish_serving(sock, protocol) else Reason.STOPPING

    def _end_of_stream(self, protocol: UpperProtocol) -> str:
        """The client closed (or half-closed): send what is still due, then the socket closes."""
        reply, _ = protocol.feed_eof()
        if reply:
            self.connection.sendall(reply)
        if self.server.stopping:
            return Reason.STOPPING
        return Reason.COMMAND if protocol.command_seen else Reason.EOF
