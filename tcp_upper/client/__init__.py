"""The client: :class:`UpperClient`, a thin class over the socket, and the interactive program.

::

    with UpperClient("localhost", 5000) as client:
        client.send("hola servidor")   # -> "HOLA SERVIDOR"
    # leaving the block sends DESCONEXION and waits (bounded) for the server to close

Every failure is an :class:`~tcp_upper.errors.UpperClientError` (a ``ConnectionError``) whose
message names host and port and says what to check.
"""

from __future__ import annotations

import socket
import sys
import time
from types import TracebackType

from ..config import Settings
from ..errors import UpperClientError
from ..protocol import is_command
from ..system import format_address

COMMAND = "DESCONEXION"
PROMPT = "Cliente envía: "
REPLY_PREFIX = "Servidor responde: "
CLOSED_LINE = "Conexión cerrada."

#: Exit status for Ctrl-C, as shells report a process ended by SIGINT.
EXIT_INTERRUPTED = 130

_RECV_SIZE = 64 * 1024


class UpperClient:
    """A connection to a tcp_upper server, opened on construction.

    *timeout* bounds connecting, each reply and the wait for the server's close, in seconds.
    """

    def __init__(self, host: str = Settings.host, port: int = Settings.port,
                 timeout: float = Settings.timeout) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._where = format_address((host, port))
        self._buffer = b""
        try:
            self._sock: socket.socket | None = socket.create_connection((host, port), timeout)
        except OSError as exc:
            raise self._error(exc, "no se puede conectar") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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

    def send(self, text: str) -> str:
        """Send one line and return the server's reply without its line ending.

        Sending the disconnect command is the same as :meth:`close` and returns ``""``.
        Raises ``ValueError`` if *text* holds a line break, :class:`UpperClientError` if the
        server is full, does not answer in time or is gone.
        """
        if "\n" in text or "\r" in text:
            raise ValueError("send() takes one line, without line breaks")
        if is_command(text):
            self.close(text)
            return ""
        sock = self._require_open()
        try:
            sock.sendall(text.encode("utf-8", "surrogateescape") + b"\n")
            line = self._read_line(sock)
        except OSError as exc:
            self._abort()
            raise self._error(exc, "se perdió la conexión") from None
        if line is None:
            self._abort()
            raise UpperClientError(f"El servidor {self._where} cerró la conexión sin responder")
        reply = line.decode("utf-8", "surrogateescape")  # the inverse of how text was sent
        if reply.startswith("ERROR") and reply != text.upper():
            # Not an echo of ours: the server refused us (it is full) and closed.
            self._abort()
            raise UpperClientError(f"El servidor {self._where} rechazó la conexión: {reply}")
        return reply

    def close(self, command: str = COMMAND) -> None:
        """Send the disconnect command and wait (bounded) for the server to close; idempotent.

        A server already gone is not an error here: the connection is closed either way.
        """
        sock = self._sock
        if sock is None:
            return
        try:
            sock.sendall(command.encode("utf-8") + b"\n")
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline and sock.recv(_RECV_SIZE):
                pass  # anything still in flight; the server sends nothing for the command
        except OSError:
            pass  # reset, timed out or already gone: nothing left to do but close
        finally:
            self._abort()

    def _require_open(self) -> socket.socket:
        if self._sock is None:
            raise UpperClientError(f"La conexión con {self._where} ya está cerrada")
        return self._sock

    def _read_line(self, sock: socket.socket) -> bytes | None:
        """Read up to and including the next newline; ``None`` if the server closed first."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line, self._buffer = self._buffer[:newline], self._buffer[newline + 1:]
                return line.rstrip(b"\r")
            chunk = sock.recv(_RECV_SIZE)
            if not chunk:
                return None
            self._buffer += chunk

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
            detail = (exc.strerror or str(exc)).lower()
        hint = ""
        if isinstance(exc, ConnectionRefusedError):
            hint = ("; ¿está el servidor en marcha? Arránquelo con 'python -m tcp_upper.server' "
                    "o revise --host/--port y config.env")
        return UpperClientError(f"{what.capitalize()} con {self._where}: {detail}{hint}")


def _read_message(interactive: bool) -> str:
    """One line from the user; raises EOFError at end of input."""
    if interactive:
        return input(PROMPT)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    message = line.rstrip("\r\n")
    print(PROMPT + message, flush=True)
    return message


def run_session(host: str, port: int, timeout: float) -> int:
    """The interactive program: prompt, send, show the reply, until DESCONEXION or end of input.

    Returns the exit status: 0 after an orderly close, 1 on a connection problem, 130 on Ctrl-C
    (also while connecting or while waiting for the server to close).
    """
    for stream in (sys.stdin, sys.stdout):  # bytes that are not UTF-8 must not crash I/O
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return _converse(host, port, timeout, sys.stdin.isatty())
    except KeyboardInterrupt:  # the socket, if any, was closed on the way out
        print()
        return EXIT_INTERRUPTED
    except UpperClientError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def _converse(host: str, port: int, timeout: float, interactive: bool) -> int:
    with UpperClient(host, port, timeout) as client:
        try:
            while True:
                try:
                    message = _read_message(interactive)
                except EOFError:
                    if interactive:
                        print()
                    break
                if not message.strip():
                    continue
                if is_command(message):
                    client.close(message)
                    break
                print(REPLY_PREFIX + client.send(message), flush=True)
        except KeyboardInterrupt:
            print()
            client.close()  # a second Ctrl-C here ends the wait: run_session reports it
            print(CLOSED_LINE, flush=True)
            return EXIT_INTERRUPTED
        client.close()
    print(CLOSED_LINE, flush=True)
    return 0
