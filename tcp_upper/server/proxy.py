"""``--proxy-protocol``: the PROXY header at the server's door, read before anything else.

Behind a proxy (HAProxy ``send-proxy-v2``) every connection starts with a header naming the real
client. Only peers in ``--trusted-proxies`` may send it; anyone else, or a trusted peer without
a valid header within :data:`HEADER_SECONDS`, gets one ``ERROR`` line and is closed: that is
what keeps clients from reaching an instance directly, around the proxy.

The header is read with ``MSG_PEEK`` and then consumed exactly: bytes after it stay in the
socket for the protocol, so a client's first line is never mistaken for header bytes and
header bytes are never upper-cased back. Parsing is :mod:`tcp_upper.proxy_protocol`'s.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Callable

from ..proxy_protocol import (
    V2_FIXED_BYTES,
    V2_MAX_PAYLOAD,
    ProxyHeader,
    ProxyProtocolError,
    is_trusted,
    parse,
)
from ..system import format_address
from .sockets import set_timeout

if TYPE_CHECKING:
    from .handler import UpperHandler

log = logging.getLogger(__name__)

#: A proxy writes the header with its connect, before any client byte: a few seconds is
#: generous, and keeps a silent direct connection from holding a thread for long.
HEADER_SECONDS = 3.0

#: After refusing, what the peer still sends is discarded this long, so that closing does not
#: reset the connection and destroy the ERROR line before the peer reads it.
REFUSED_DRAIN_SECONDS = 0.5

UNTRUSTED_MESSAGE = "ERROR conexión directa no admitida: conecte a través del proxy\n"
BAD_HEADER_MESSAGE = "ERROR se esperaba una cabecera PROXY válida\n"


class ProxyRefused(Exception):
    """The connection is refused; *reason* is logged, *reply* (if any) sent to the peer."""

    def __init__(self, reason: str, reply: str | None = BAD_HEADER_MESSAGE) -> None:
        super().__init__(reason)
        self.reason, self.reply = reason, reply


def _consume(sock: socket.socket, count: int) -> None:
    """Read and drop *count* bytes that MSG_PEEK already showed are queued (so each recv()
    returns at once, and never reads past them)."""
    while count > 0:
        data = sock.recv(count)
        if not data:  # cannot happen while they are queued; do not spin if it does
            return
        count -= len(data)


def read_header(sock: socket.socket, timeout: float, stopping: Callable[[], bool]) -> ProxyHeader:
    """Read the PROXY header within *timeout* s, consuming exactly its bytes.

    Raises :class:`ProxyRefused` when it is invalid, incomplete at the deadline or at the
    peer's end of stream, or when *stopping* turns true (the server stops: no reply then).
    """
    deadline = time.monotonic() + timeout
    received = b""  # header bytes consumed so far (a header split over several segments)
    while True:
        left = deadline - time.monotonic()
        if stopping():
            raise ProxyRefused("parada del servidor", reply=None)
        if left <= 0:
            raise ProxyRefused(f"sin cabecera PROXY completa en {timeout:g} s")
        set_timeout(sock, socket.SO_RCVTIMEO, left)
        try:
            chunk = sock.recv(V2_FIXED_BYTES + V2_MAX_PAYLOAD - len(received), socket.MSG_PEEK)
        except BlockingIOError:  # timed out, or close_clients() shortened the timeout
            continue
        if not chunk:
            raise ProxyRefused("cerró la conexión antes de enviar la cabecera PROXY")
        try:
            header = parse(received + chunk)
        except ProxyProtocolError as exc:
            raise ProxyRefused(f"cabecera PROXY no válida: {exc}") from None
        # An incomplete header means every byte seen so far belongs to it.
        _consume(sock, len(chunk) if header is None else header.length - len(received))
        if header is not None:
            return header
        received += chunk


def accept_proxied(handler: UpperHandler) -> bool:
    """The ``--proxy-protocol`` gate, run first by the handler: True when the connection may
    be served (its logged peer is then the header's source address).

    A v2 ``LOCAL`` connection (a health check) is served with its log lines at DEBUG. On False
    the peer got its ERROR line (logged at WARNING) and the handler closes it.
    """
    server, sock = handler.server, handler.connection
    try:
        if not is_trusted(handler.client_address[0], server.trusted_proxies):
            raise ProxyRefused("no está en --trusted-proxies", UNTRUSTED_MESSAGE)
        header = read_header(sock, HEADER_SECONDS, lambda: server.stopping)
        set_timeout(sock, socket.SO_RCVTIMEO, server.idle_timeout)
        if server.stopping:  # close_clients() may have set the stop timeout just before
            raise ProxyRefused("parada del servidor", reply=None)
    except ProxyRefused as exc:
        if exc.reply is None:
            log.debug("Conexión de %s cerrada: %s", handler.peer, exc.reason)
        else:
            log.warning("Conexión de %s rechazada: %s", handler.peer, exc.reason)
            with contextlib.suppress(OSError):  # it left already
                sock.send(exc.reply.encode(), socket.MSG_DONTWAIT)
        return False
    except OSError as exc:  # reset while reading the header: nothing to answer
        log.warning("Conexión de %s rechazada: %s", handler.peer, exc.strerror or exc)
        return False
    if header.local:
        handler.log_level = logging.DEBUG
    elif header.source is not None:
        log.debug("Cliente %s llega a través de %s", format_address(header.source), handler.peer)
        handler.peer = format_address(header.source)
    return True
