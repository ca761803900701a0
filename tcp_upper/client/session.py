"""The client program: a conversation at a terminal or through a pipe, or one message.

At a terminal, lines are edited with the standard library's ``readline`` when it can be
imported (arrows, Home/End, Ctrl-A/E, the up arrow for earlier messages; history in memory only,
no file), and a thread watches the connection so that a server that goes away is reported at
once, without the user typing. Output that cannot be written (``| head -1``, ``> /dev/full``)
ends the program quietly, as the Python documentation advises for SIGPIPE.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import ssl
import sys
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType

from ..errors import UpperClientError
from ..protocol import is_command
from . import COMMAND, UpperClient

PROMPT = "Cliente envía: "
REPLY_PREFIX = "Servidor responde: "
CLOSED_LINE = "Conexión cerrada."

#: Exit status for Ctrl-C, as shells report a process ended by SIGINT.
EXIT_INTERRUPTED = 130
#: Exit status when standard output is a closed pipe, as shells report a process ended by
#: SIGPIPE (``yes | head -1``).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class _OutputClosed(Exception):
    """Standard output cannot be written: a closed pipe, a full disk."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause)
        self.cause = cause


class _ServerClosed(Exception):
    """Raised in the main thread, at the prompt, when the server closed the connection."""


def _show(*parts: str) -> None:
    """Write one line to standard output now; raise :class:`_OutputClosed` if it cannot."""
    if sys.stdout is None:  # started with standard output closed (>&-)
        raise _OutputClosed(OSError(errno.EBADF, "la salida estándar está cerrada"))
    try:
        for part in parts:  # no concatenation: a reply may be a 32 MiB line
            sys.stdout.write(part)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except OSError as exc:
        raise _OutputClosed(exc) from exc


def _report(prog: str, message: str) -> None:
    """One error line on standard error, in argparse's style; a broken stderr is ignored."""
    with contextlib.suppress(OSError):
        print(f"{prog}: error: {message[:1].lower()}{message[1:]}", file=sys.stderr, flush=True)


def server_command() -> str:
    """How to start the server, written the way this client was started: ``tcp-upper-server``
    beside the ``tcp-upper-client`` that runs, or ``<the same python> -m tcp_upper.server``."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0).startswith("tcp-upper-client"):  # the console script
        sibling = os.path.join(os.path.dirname(argv0), "tcp-upper-server")
        found = shutil.which("tcp-upper-server")
        if found and os.path.abspath(found) == os.path.abspath(sibling):
            return "tcp-upper-server"  # typed as a bare name, found on PATH
        return sibling
    if os.path.basename(argv0) != "__main__.py":  # not run with -m: called from Python code
        return "tcp-upper-server"
    python = getattr(sys, "orig_argv", [sys.executable])[0] or "python3"  # orig_argv: 3.10+
    return f"{python} -m tcp_upper.server"


def enable_line_editing() -> bool:
    """Give ``input()`` line editing and in-memory history with ``readline``, if importable.

    readline also reads the terminal byte by byte (non-canonical mode), so a line is not cut at
    the terminal's 4,095-byte limit. Tab inserts itself instead of completing file names.
    """
    try:
        import readline
    except ImportError:
        return False
    if "libedit" not in (readline.__doc__ or ""):
        readline.parse_and_bind("tab: tab-insert")
    return True


#: How often the close watcher repeats its signal until the main thread takes it.
RESIGNAL_SECONDS = 0.1


class _CloseWatcher:
    """Notices the server closing while the main thread waits for the user.

    A thread polls the socket for the peer's close (POLLRDHUP: data such as TLS session tickets
    does not wake it) and sends SIGUSR1 to the main thread. The handler raises
    :class:`_ServerClosed` only inside :meth:`prompt`: the blocked read (readline's select(),
    or a plain read()) returns EINTR, Python runs the handler, and readline puts the terminal
    back before the exception leaves ``input()``.
    """

    def __init__(self, fileno: int) -> None:
        self._fileno = fileno
        self._wake_read, self._wake_write = os.pipe()
        self._armed = False
        self._closed = threading.Event()
        self._taken = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, name="close-watcher", daemon=True)
        self._previous: object = None

    def __enter__(self) -> _CloseWatcher:
        self._previous = signal.signal(signal.SIGUSR1, self._on_signal)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        os.write(self._wake_write, b"x")
        self._thread.join()
        os.close(self._wake_read)
        os.close(self._wake_write)
        if not self._closed.is_set():  # otherwise a signal may still be on its way: keep ours
            signal.signal(signal.SIGUSR1, self._previous)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def prompt(self) -> Iterator[None]:
        """A block during which the server's close raises :class:`_ServerClosed`."""
        self._armed = True
        try:
            if self._closed.is_set():  # it closed while we were busy: that signal did nothing
                raise _ServerClosed
            yield
        finally:
            self._armed = False

    def _watch(self) -> None:
        # Signals (Ctrl-C above all) must reach the main thread: one taken by this thread
        # would not interrupt the main thread's blocking calls.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        poller = select.poll()
        poller.register(self._fileno, select.POLLRDHUP)  # POLLHUP and POLLERR come anyway
        poller.register(self._wake_read, select.POLLIN)
        while not any(fileno == self._wake_read for fileno, _ in poller.poll()):
            self._closed.set()
            poller.unregister(self._fileno)
            # A signal that lands while readline is not yet in select() only runs its handler
            # at the next key: send it again until the handler took it (or we are stopped).
            while not self._taken.is_set():
                if self._main is not None:
                    signal.pthread_kill(self._main, signal.SIGUSR1)
                if poller.poll(RESIGNAL_SECONDS * 1000):
                    break

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._armed and self._closed.is_set():  # not a SIGUSR1 from someone else
            self._taken.set()
            raise _ServerClosed


def _read_message(interactive: bool) -> str:
    """One line from the user; raises EOFError at end of input."""
    if interactive:
        return input(PROMPT)
    line = sys.stdin.readline() if sys.stdin is not None else ""  # None: started with <&-
    if not line:
        raise EOFError
    message = line.rstrip("\r\n")
    _show(PROMPT, message)
    return message


def run_session(host: str, port: int, timeout: float, *, prog: str = "tcp-upper-client",
                message: str | None = None, ssl_context: ssl.SSLContext | None = None) -> int:
    """The client program: the conversation, or only *message* and its reply (one-shot).

    Returns the exit status: 0 after an orderly close, 1 on a connection problem (reported as
    one line on stderr, prefixed with *prog*) or unwritable output, 141 when the output is a
    closed pipe, 130 on Ctrl-C (also while connecting or while waiting for the server to close).
    """
    for stream in (sys.stdin, sys.stdout):  # bytes that are not UTF-8 must not crash I/O
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        with UpperClient(host, port, timeout, ssl_context=ssl_context) as client:
            if message is not None:
                reply = client.send(message)
                if not client.closed:
                    _show(reply)
                return 0
            return _converse(client, sys.stdin is not None and sys.stdin.isatty())
    except KeyboardInterrupt:  # the socket, if any, was closed on the way out
        _newline()
        return EXIT_INTERRUPTED
    except UpperClientError as exc:
        hint = ""
        if isinstance(exc.__cause__, ConnectionRefusedError):
            hint = f" Arránquelo con '{server_command()}' o revise --host/--port y config.env."
        _report(prog, f"{exc}{hint}")
        return 1
    except _OutputClosed as exc:
        return _output_closed(prog, exc.cause)


def _newline() -> None:
    with contextlib.suppress(OSError):
        print(flush=True)


def _output_closed(prog: str, cause: OSError) -> int:
    """Point stdout at /dev/null so that the exit's flush cannot fail again; the status."""
    if sys.stdout is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    if cause.errno == errno.EPIPE:
        return EXIT_BROKEN_PIPE  # whoever reads stopped reading: nothing to say
    reason = ("no queda espacio" if cause.errno == errno.ENOSPC else
              (cause.strerror or str(cause)).lower())  # EBADF's is ours, in Spanish
    _report(prog, f"no se puede escribir la salida: {reason}")
    return 1


def _converse(client: UpperClient, interactive: bool) -> int:
    """Prompt, send, show the reply, until DESCONEXION or end of input; the exit status."""
    if interactive:
        enable_line_editing()
    try:
        if interactive:
            with _CloseWatcher(client.fileno()) as watcher:
                command = _loop(client, interactive, watcher)
        else:
            command = _loop(client, interactive, None)
        client.close(command)
    except KeyboardInterrupt:
        _newline()
        client.close()  # a second Ctrl-C here ends the wait: run_session reports it
        _show(CLOSED_LINE)
        return EXIT_INTERRUPTED
    except _ServerClosed:
        _newline()  # the prompt (and what was typed) stays on its own line
        raise client.closed_by_server() from None
    _show(CLOSED_LINE)
    return 0


def _loop(client: UpperClient, interactive: bool, watcher: _CloseWatcher | None) -> str:
    """Talk until the disconnect command (returned, as typed) or the end of input."""
    while True:
        try:
            if watcher is not None:
                with watcher.prompt():
                    text = _read_message(interactive)
            else:
                text = _read_message(interactive)
        except EOFError:
            if interactive:
                _newline()
            return COMMAND
        # Several lines pasted at once arrive as one (readline's bracketed paste keeps their
        # line breaks): each is a message.
        for message in text.split("\n"):
            if not message.strip():
                continue
            if is_command(message):
                return message
            _show(REPLY_PREFIX, client.send(message))
