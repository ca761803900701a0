"""The client: :class:`UpperClient`, a thin class over the socket (the program is in ``session``).

::

    with UpperClient("localhost", 5000) as client:
        client.send("hola servidor")   # -> "HOLA SERVIDOR"
    # leaving the block sends DESCONEXION and waits (bounded) for the server to close

Every failure is an :class:`~tcp_upper.errors.UpperClientError` (a ``ConnectionError``) whose
message names host and port; the ``OSError`` or ``ssl.SSLError`` behind it is its ``__cause__``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import time
from types import TracebackType

from ..config import Settings
from ..errors import UpperClientError
from ..protocol import is_command
from ..system import format_address

COMMAND = "DESCONEXION"

_RECV_SIZE = 256 * 1024
#: Longest single blocking wait. CPython runs a signal's Python handler between bytecodes, so
#: a Ctrl-C that lands just before a wait starts (the process was descheduled there) is only
#: acted on when the wait returns: waits are cut into slices, and Ctrl-C takes effect within
#: one, whatever the timeout.
_WAIT_SLICE = 0.2
#: Bytes handed to one send(): small enough to keep reading the reply in between.
_SEND_SIZE = 256 * 1024
#: The errors a non-blocking socket (plain or TLS) gives when it cannot go on right now.
_NOT_READY = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

#: What the usual connection errors mean, in Spanish (others keep the system's words).
_REASONS = {
    errno.ECONNREFUSED: "conexión rechazada",
    errno.ECONNRESET: "el servidor cortó la conexión",
    errno.EPIPE: "el servidor cerró la conexión",
    errno.ETIMEDOUT: "se agotó el tiempo de espera",
    errno.EHOSTUNREACH: "no hay ruta hasta la máquina",
    errno.ENETUNREACH: "la red no está disponible",
    errno.EADDRNOTAVAIL: "la dirección no está disponible",
}


def client_ssl_context(cafile: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A TLS context for :class:`UpperClient`: the system's CAs, or only *cafile*'s (PEM), or
    no verification at all with *insecure* (for tests). Raises ``OSError``/``ssl.SSLError``
    when *cafile* cannot be loaded."""
    context = ssl.create_default_context(cafile=cafile)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _poll_until(poller: select.poll, deadline: float) -> None:
    """Wait until *poller* reports its socket ready, in slices (see _WAIT_SLICE); raise
    ``socket.timeout`` at *deadline* (a ``time.monotonic()`` time)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        if poller.poll(min(remaining, _WAIT_SLICE) * 1000):
            return


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """``socket.create_connection``, with each address's wait cut into slices (see
    _WAIT_SLICE): Ctrl-C while connecting ends it at once. Each address gets *timeout*; when
    none connects, the last one's error is raised, as there."""
    errors: list[OSError] = []
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            deadline = time.monotonic() + timeout
            error = sock.connect_ex(address)
            if error == errno.EINPROGRESS:
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                _poll_until(poller, deadline)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))  # its subclass: ConnectionRefusedError…
            sock.settimeout(timeout)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(exc)
        except BaseException:
            sock.close()
            raise
    raise errors[-1] if errors else OSError(f"getaddrinfo gave no address for {host!r}")


class UpperClient:
    """A connection to a tcp_upper server, opened on construction.

    *timeout* bounds connecting (and the TLS handshake), the wait for the server's close, and
    each reply: the server must take or send some bytes at least every *timeout* seconds, so a
    long line is never cut short by a timeout while it is moving. With *ssl_context* the
    connection uses TLS, verifying the certificate against *host* as the context says.
    """

    def __init__(self, host: str = Settings.host, port: int = Settings.port,
                 timeout: float = Settings.timeout,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._where = format_address((host, port))
        self._buffer = bytearray()
        try:
            sock = _connect(host, port, timeout)
        except OSError as exc:
            raise self._error(exc, "no se puede conectar") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except (OSError, ValueError) as exc:  # wrap_socket closes the socket on failure
                raise self._tls_error(exc) from exc
        sock.setblocking(False)  # send() reads and writes at once; each wait is a poll()
        self._sock: socket.socket | None = sock

    def __enter__(self) -> UpperClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by :meth:`close` or the command)."""
        return self._sock is None

    def fileno(self) -> int:
        """The socket's file descriptor, to wait on with ``poll()`` (for instance for the
        server closing); the client keeps reading and writing it itself."""
        return self._require_open().fileno()

    def send(self, text: str) -> str:
        """Send one line and return the server's reply without its line ending.

        *text* may be of any length: it is sent while the reply is read, so neither side's
        buffers fill up. A ``\\r`` in *text* is data like any other character (the protocol's
        lines end at ``\\n``); at its end it makes the line end in ``\\r\\n``, and the reply then
        comes back without that ``\\r\\n``. Sending the disconnect command is the same as
        :meth:`close` and returns ``""``. Raises ``ValueError`` if *text* holds a ``\\n`` (two
        lines), :class:`UpperClientError` if the server is full, does not answer in time or is
        gone.
        """
        if "\n" in text:
            raise ValueError("send() takes one line: text must not contain '\\n'")
        if is_command(text):
            self.close(text)
            return ""
        sock = self._require_open()
        try:
            line = self._exchange(sock, text.encode("utf-8", "surrogateescape") + b"\n")
        except OSError as exc:
            self._abort()
            raise self._error(exc, "se perdió la conexión") from exc
        if line is None:
            self._abort()
            raise UpperClientError(f"El servidor {self._where} cerró la conexión sin responder")
        if line.endswith(b"\r"):
            del line[-1:]
        reply = line.decode("utf-8", "surrogateescape")  # the inverse of how text was sent
        del line
        if reply.startswith("ERROR") and reply != text.upper():
            # Not an echo of ours: the server refused us (it is full) and closed.
            self._abort()
            raise self._refused(reply)
        return reply

    def close(self, command: str = COMMAND) -> None:
        """Send the disconnect command and wait (bounded) for the server to close; idempotent.

        A server already gone is not an error here: the connection is closed either way.
        """
        sock = self._sock
        if sock is None:
            return
        try:
            sock.settimeout(self.timeout)
            sock.sendall(command.encode("utf-8") + b"\n")
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(_WAIT_SLICE)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                try:
                    if not sock.recv(_RECV_SIZE):
                        break  # closed; anything before was still in flight (not a reply)
                except socket.timeout:
                    continue
        except (OSError, ValueError):
            pass  # reset, timed out, TLS torn down or already gone: nothing left but close
        finally:
            self._abort()

    def closed_by_server(self) -> UpperClientError:
        """The error to report once the server closed on its own (``poll()`` on
        :meth:`fileno` said so): its refusal when it sent its ``ERROR`` line (full), else that
        it closed. Reads what is left (bounded by *timeout*) and closes the connection."""
        sock = self._require_open()
        data = self._buffer
        try:
            sock.settimeout(self.timeout)
            while len(data) < _RECV_SIZE:
                chunk = sock.recv(_RECV_SIZE)
                if not chunk:
                    break
                data += chunk
        except (OSError, ValueError):
            pass  # reset or timed out: what arrived is all there is
        self._abort()
        first = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
        if first.startswith("ERROR"):
            return self._refused(first)
        return UpperClientError(f"El servidor {self._where} cerró la conexión")

    def _refused(self, line: str) -> UpperClientError:
        """The error for the server's ``ERROR`` line (it is full): quoted, with where."""
        return UpperClientError(f"El servidor {self._where} rechazó la conexión: {line}")

    def _require_open(self) -> socket.socket:
        if self._sock is None:
            raise UpperClientError(f"La conexión con {self._where} ya está cerrada")
        return self._sock

    def _exchange(self, sock: socket.socket, payload: bytes) -> bytearray | None:
        """Send *payload* while reading; return the next line (without its ``\\n``), or
        ``None`` if the server closed first. Raises ``socket.timeout`` when neither direction
        moved for :attr:`timeout` seconds."""
        newline = self._buffer.find(b"\n")
        if newline >= 0:  # a line that arrived unasked: it is the answer (an ERROR line)
            return self._take_line(newline)
        view, sent, send_error = memoryview(payload), 0, None
        poller, deadline = select.poll(), time.monotonic() + self.timeout
        while True:
            moved, read_wants_write = False, False
            if sent < len(view) and send_error is None:
                try:
                    sent += sock.send(view[sent:sent + _SEND_SIZE])
                    moved = True
                except _NOT_READY:
                    pass
                except OSError as exc:  # the server is gone or refused us: read its last words
                    send_error = exc
            try:
                chunk = sock.recv(_RECV_SIZE)
            except ssl.SSLWantWriteError:
                chunk, read_wants_write = None, True
            except _NOT_READY:
                chunk = None
            except ssl.SSLEOFError:  # closed without TLS's close_notify: still the end
                chunk = b""
            if chunk is not None:
                if not chunk:
                    if send_error is not None:
                        raise send_error
                    return None
                start = len(self._buffer)
                self._buffer += chunk
                newline = self._buffer.find(b"\n", start)
                if newline >= 0:
                    return self._take_line(newline)
                moved = True
            if moved:
                deadline = time.monotonic() + self.timeout
                continue
            writing = (sent < len(view) and send_error is None) or read_wants_write
            poller.register(sock, select.POLLIN | (select.POLLOUT if writing else 0))
            _poll_until(poller, deadline)

    def _take_line(self, newline: int) -> bytearray:
        line = self._buffer
        self._buffer = line[newline + 1:]
        del line[newline:]
        return line

    def _abort(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _error(self, exc: OSError, what: str) -> UpperClientError:
        if isinstance(exc, socket.timeout):
            detail = f"sin respuesta en {self.timeout:g} s"
        elif isinstance(exc, socket.gaierror):
            detail = f"no se encuentra el nombre {self.host!r}"
        else:
            detail = _REASONS.get(exc.errno or 0, (exc.strerror or str(exc)).lower())
        hint = "; ¿está el servidor en marcha?" if isinstance(exc, ConnectionRefusedError) else ""
        return UpperClientError(f"{what.capitalize()} con {self._where}: {detail}{hint}")

    def _tls_error(self, exc: Exception) -> UpperClientError:
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = f"el certificado del servidor no es de confianza ({exc.verify_message})"
        elif isinstance(exc, socket.timeout):
            detail = f"sin respuesta en {self.timeout:g} s"
        elif isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
            detail = f"el servidor no responde con TLS ({exc.reason or exc}); ¿habla TLS?"
        else:
            detail = "el servidor cortó la negociación"
        return UpperClientError(f"No se puede conectar por TLS con {self._where}: {detail}")
