"""Clients for the fault tests: what each one sent, got back and saw go wrong, bounded in time.

Three kinds, all through HAProxy's front on loopback:

- new clients (:func:`converse_many`): connect, two lines, ``DESCONEXION``, end of stream;
- held clients (:class:`Held`): sockets kept open across a fault, one line at a time;
- probes (:class:`ClientProbe`): real ``python -m tcp_upper.client --timeout N`` processes fed
  through a pipe, to see the user's view: a reply, or one clear error line within the timeout.

Every reply is compared byte by byte with the upper-case of what was sent: a reply that is
late or missing is an error, a byte that differs is a *wrong byte*, and those must never happen.
Which server a client landed on is read from HAProxy's ``show sess`` by the client's port, and
the servers' states from its ``show stat``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, TypeVar

from conftest import ESTABLISHED, tcp_sockets, wait_until

from tcp_upper import cluster as cl

T = TypeVar("T")
WORKERS = 16
#: Bound on any single wait for the cluster to change state; far above the expected ~2 s.
STATE_TIMEOUT = 15.0
SESSION = re.compile(r"src=127\.0\.0\.1:(\d+) fe=\S+ be=\S+ srv=(\S+)")


@dataclass
class Outcome:
    """One client's conversation: served correctly or not, why not, and how long it took."""

    ok: bool
    wrong_bytes: int = 0
    error: str = ""
    seconds: float = 0.0


def count_wrong(got: bytes, expected: bytes) -> int:
    """Bytes of *got* that differ from *expected* (missing bytes are an error, not wrong)."""
    return sum(a != b for a, b in zip(got, expected)) + max(len(got) - len(expected), 0)


class Closed(ConnectionError):
    """The other end closed before the whole reply came."""


def _describe(exc: OSError) -> str:
    """A short name for what went wrong, for the figures."""
    if isinstance(exc, socket.timeout):
        return "timeout"
    if isinstance(exc, Closed):
        return "closed"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return type(exc).__name__


def exchange(sock: socket.socket, text: str, timeout: float) -> Outcome:
    """Send one line on *sock*, read the reply line (bounded by *timeout*) and judge it."""
    expected = text.upper().encode() + b"\n"
    started = time.monotonic()
    deadline = started + timeout
    got = b""
    try:
        sock.sendall(text.encode() + b"\n")
        while not got.endswith(b"\n") and len(got) < len(expected):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(4096)
            if not chunk:
                raise Closed
            got += chunk
    except OSError as exc:
        return Outcome(False, count_wrong(got, expected), _describe(exc))
    if got == expected:
        return Outcome(True, seconds=time.monotonic() - started)
    short = len(got) < len(expected)
    return Outcome(False, count_wrong(got, expected), "short reply" if short else "wrong reply")


def converse(port: int, text: str, timeout: float) -> Outcome:
    """A new client: two lines, then DESCONEXION and the server's orderly close."""
    started = time.monotonic()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return Outcome(False, error=f"connect: {_describe(exc)}")
    with sock:
        wrong = 0
        for line in (f"{text} ñandú", f"{text} straße"):
            outcome = exchange(sock, line, timeout)
            wrong += outcome.wrong_bytes
            if not outcome.ok:
                return Outcome(False, wrong, outcome.error)
        try:
            sock.sendall(b"DESCONEXION\n")
            sock.settimeout(timeout)
            tail = sock.recv(4096)
        except OSError as exc:
            return Outcome(False, wrong, f"close: {_describe(exc)}")
        return Outcome(tail == b"", wrong + len(tail), "" if tail == b"" else "no close",
                       time.monotonic() - started)


def in_parallel(function: Callable[[int], T], count: int) -> list[T]:
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(function, range(count)))


def converse_many(port: int, count: int, tag: str, timeout: float) -> list[Outcome]:
    """*count* new clients, up to 16 at a time, each with its own text."""
    return in_parallel(lambda i: converse(port, f"{tag} {i}", timeout), count)


def backends_of(front: cl.Cluster) -> dict[int, str]:
    """HAProxy's open sessions: client port -> server name (``show sess``)."""
    return {int(port): name
            for port, name in SESSION.findall(front.haproxy_command("show sess"))}


@dataclass
class Held:
    """A client kept open across a fault, and the server HAProxy gave it."""

    sock: socket.socket
    backend: str = ""
    outcomes: list[Outcome] = field(default_factory=list)


def open_held(front: cl.Cluster, count: int, timeout: float) -> list[Held]:
    """*count* clients through the front, each answered once, with their servers known."""
    held: list[Held] = []
    try:
        for i in range(count):
            held.append(Held(socket.create_connection(("127.0.0.1", front.front_port),
                                                      timeout=timeout)))
            held[-1].outcomes.append(exchange(held[-1].sock, f"hola {i}", timeout))
        sessions = backends_of(front)
        for session in held:
            session.backend = sessions.get(session.sock.getsockname()[1], "?")
    except BaseException:
        close_held(held)
        raise
    return held


def exchange_all(held: list[Held], tag: str, timeout: float) -> None:
    """One line on every held client at once (a dead one costs its timeout, not the sum);
    each outcome is added to its client's."""
    def one(i: int) -> None:
        held[i].outcomes.append(exchange(held[i].sock, f"{tag} {i}", timeout))

    in_parallel(one, len(held))


def close_held(held: list[Held]) -> None:
    for session in held:
        session.sock.close()


class ClientProbe:
    """``python -m tcp_upper.client --timeout N`` through the front, fed line by line."""

    @dataclass
    class Result:
        code: int | None
        seconds: float
        hung: bool
        stdout: list[str]
        stderr: list[str]

    def __init__(self, port: int, timeout: float, cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tcp_upper.client", "--host", "127.0.0.1",
             "--port", str(port), "--timeout", f"{timeout:g}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", cwd=cwd, env=env,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.backend = ""
        self._ended = 0.0
        self._readers = [
            threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            for stream, sink in ((self.process.stdout, self.stdout),
                                 (self.process.stderr, self.stderr))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str], sink: list[str]) -> None:
        with stream:
            for line in stream:
                sink.append(line.rstrip("\n"))

    def say(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def answered(self, text: str) -> bool:
        """True once the client printed the server's reply to *text*."""
        return f"Servidor responde: {text.upper()}" in self.stdout

    def port(self) -> int | None:
        """The client's own TCP port, from its socket in /proc (it never prints it)."""
        return next((port for port, state in tcp_sockets(self.process.pid)
                     if state == ESTABLISHED), None)

    def end(self, text: str) -> None:
        """Send a last line and end the input: the client replies to it, then disconnects."""
        self._ended = time.monotonic()
        with contextlib.suppress(BrokenPipeError):  # it already exited: its output says why
            self.say(text)
            assert self.process.stdin is not None
            self.process.stdin.close()

    def result(self, timeout: float) -> ClientProbe.Result:
        """Wait (at most *timeout*) for the client to exit after :meth:`end`; kill it if not."""
        hung = False
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            hung = True
            self.stop()
        seconds = time.monotonic() - self._ended
        self.stop()
        return ClientProbe.Result(self.process.returncode, round(seconds, 2), hung,
                                  list(self.stdout), list(self.stderr))

    def stop(self) -> None:
        """Kill it if it still runs (by PID), and wait for its output to be read."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        for reader in self._readers:
            reader.join(5)


def start_probes(front: cl.Cluster, count: int, timeout: float, cwd: Path,
                 env: dict[str, str]) -> list[ClientProbe]:
    """*count* client processes through the front, each answered once, servers known."""
    probes = [ClientProbe(front.front_port, timeout, cwd, env) for _ in range(count)]
    try:
        for i, probe in enumerate(probes):
            probe.say(f"hola {i}")
        wait_until(lambda: all(p.answered(f"hola {i}") for i, p in enumerate(probes)),
                   what="every client process answered once")
        sessions = backends_of(front)
        for probe in probes:
            probe.backend = sessions.get(probe.port() or 0, "?")
    except BaseException:
        for probe in probes:
            probe.stop()
        raise
    return probes


# -- HAProxy's view ------------------------------------------------------------------------


def all_up(front: cl.Cluster) -> bool:
    return all(state["status"] == "UP" for state in front.server_states().values())


def wait_status(front: cl.Cluster, name: str, down: bool, since: float) -> float:
    """Wait until HAProxy shows *name* DOWN (or fully UP); seconds from *since* to then."""
    def reached() -> bool:
        status = front.server_states()[name]["status"]
        return status.startswith("DOWN") if down else status == "UP"

    wait_until(reached, STATE_TIMEOUT, f"{name} {'DOWN' if down else 'UP'} in show stat")
    return round(time.monotonic() - since, 2)


def sessions_of(front: cl.Cluster, name: str) -> int:
    """Sessions HAProxy has sent to server *name* so far (checks not included)."""
    return int(front.server_states()[name]["stot"])


class StateLog:
    """Polls ``show stat`` in a thread: how often a server went DOWN during a window."""

    def __init__(self, front: cl.Cluster, name: str) -> None:
        self.front, self.name = front, name
        self.statuses: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.statuses.append(self.front.server_states()[self.name]["status"])

    def downs(self) -> int:
        """Stop polling; the number of times the server went from not DOWN to DOWN."""
        self._stop.set()
        self._thread.join(5)
        flags = [status.startswith("DOWN") for status in self.statuses]
        return sum(1 for before, now in zip([False, *flags], flags) if now and not before)
