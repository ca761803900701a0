"""Shared fixtures: real servers on loopback port 0, always stopped, every wait bounded."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.machinery
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest
from hypothesis import settings

import tcp_upper
from tcp_upper.server import UpperServer, install_wake_handler, make_server

#: Upper bound for anything a test waits for; generous for a loaded 2-core CI machine.
DEADLINE = 10.0

LISTENING = re.compile(r"escuchando en (\[[^\]]+\]|[^\s:]+):(\d+)")

#: The promise: exit 0 within 2 s of SIGINT/SIGTERM/SIGHUP; asserted for a few clients, with
#: 0.5 s of slack for a loaded CI machine (thousands of clients: tests/test_stress.py reports).
STOP_LIMIT = 2.5


def wait_until(condition: Callable[[], Any], timeout: float = DEADLINE, what: str = "") -> Any:
    """Poll *condition* until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(delay)  # a poll interval, not a wait for something to happen
        delay = min(delay * 2, 0.05)


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without TCP_UPPER_* variables, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCP_UPPER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def queued(sock: socket.socket, request: int) -> int:
    """Bytes in one of our socket's kernel queues: ``termios.FIONREAD`` received and not read
    yet, ``termios.TIOCOUTQ`` (SIOCOUTQ) sent and not acknowledged by the peer yet."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])


#: TCP states as /proc/net/tcp writes them.
ESTABLISHED, SYN_SENT, LISTEN = "01", "02", "0A"


def tcp_sockets(pid: int, table: str = "/proc/net/tcp") -> list[tuple[int, str]]:
    """(local port, state) of each IPv4 TCP socket process *pid* has open, from *table* (the
    caller's network namespace by default; ``/proc/PID/net/tcp`` is the process's own). Empty
    once the process is gone."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
    try:
        rows = Path(table).read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return []
    return [(int(fields[1].rsplit(":", 1)[1], 16), fields[3])
            for fields in map(str.split, rows) if fields[9] in inodes]


def connect(port: int, host: str = "127.0.0.1", timeout: float = DEADLINE) -> socket.socket:
    """A client socket to the server, with every read bounded by *timeout*."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def peer_name(sock: socket.socket) -> str:
    """How the server's log names this client: its ``host:port`` (``[host]:port`` for IPv6)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reset(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER (on, 0 s) makes the kernel send RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly *size* bytes (TCP may deliver them in pieces); fail on early close."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            pytest.fail(f"connection closed after {len(data)} of {size} bytes: {data!r}")
        data += chunk
    return data


def recv_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read until the server closes (end of stream); bounded by *limit* bytes and the timeout."""
    data = b""
    while len(data) <= limit:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    pytest.fail(f"server sent more than {limit} bytes without closing")


class ThreadedServer:
    """An in-process :class:`UpperServer` serving from a background thread."""

    def __init__(self, server: UpperServer) -> None:
        self.server = server
        self.port: int = server.server_address[1]
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.close_clients(timeout=2.0)
        self.server.server_close()
        self.thread.join(DEADLINE)


def pytest_configure(config: pytest.Config) -> None:
    """Tests press Ctrl-C in the programs they start, which inherit an ignored SIGINT: a run
    started in the background by a script (bash ignores SIGINT for `command &`) must not pass
    that on to them. Python's handler is not inherited (exec resets it to the default)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: Hypothesis profile for a quicker run (``--hypothesis-profile=quick``): a fifth of the
#: examples each property asks for. .ci/run uses it on the oldest and newest Pythons, where it
#: checks the properties hold; the main run, on the default profile, explores them in full.
settings.register_profile("quick", max_examples=20)


def examples(wanted: int) -> int:
    """*wanted* examples on the default profile (100 examples), fewer on a quicker one."""
    return max(10, wanted * settings.default.max_examples // 100)


@pytest.fixture(scope="session")
def portable_speedups(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """tcp_upper/_speedups.c built with -DTCP_UPPER_NO_SSE2: the plain C loops that CPUs without
    SSE2 run. This machine (x86-64) runs the SSE2 ones, so the tests run these too."""
    source = Path(tcp_upper.__file__).with_name("_speedups.c")
    compiler = shutil.which("cc")
    if compiler is None or not source.exists():
        pytest.skip("no C compiler, or no _speedups.c beside tcp_upper (an installed wheel)")
    target = (tmp_path_factory.mktemp("portable")
              / f"_speedups{importlib.machinery.EXTENSION_SUFFIXES[0]}")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-DTCP_UPPER_NO_SSE2",
                    f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(target)],
                   check=True, timeout=120)
    spec = importlib.util.spec_from_file_location("tcp_upper._speedups", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def start_server() -> Iterator[Callable[..., ThreadedServer]]:
    """Factory: ``start_server(max_clients=2, idle_timeout=0.5, ...)`` on 127.0.0.1:0."""
    started: list[ThreadedServer] = []

    install_wake_handler()  # close_clients() interrupts client threads with a signal

    def start(**options: Any) -> ThreadedServer:
        running = ThreadedServer(make_server("127.0.0.1", 0, **options))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog at INFO for the ``tcp_upper`` loggers; records come from the server's threads."""
    caplog.set_level(logging.INFO, logger="tcp_upper")
    return caplog


@pytest.fixture
def server(start_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    """A server with the default limits on 127.0.0.1, port chosen by the kernel."""
    return start_server()


class ServerProcess:
    """``python -m tcp_upper.server`` as a child process; stderr collected line by line."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tcp_upper.server", *args],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """Wait for a stderr line matching *pattern* (a regex); fail at the deadline."""
        regex = re.compile(pattern)

        def find() -> re.Match[str] | None:
            return next(filter(None, map(regex.search, self.lines)), None)

        with self._changed:
            self._changed.wait_for(lambda: find() or self._closed, timeout)
            match = find()
        if match is None:
            pytest.fail(f"no log line matching {pattern!r}; stderr so far:\n{self.log}")
        return match

    def wait_listening(self) -> int:
        self.port = int(self.wait_for_log(LISTENING.pattern).group(2))
        return self.port

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = DEADLINE) -> int:
        """Wait for exit; returns the exit status. Fails the test (after killing) if it hangs."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"server pid {self.pid} did not exit within {timeout} s")
        self._reader.join(DEADLINE)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after the deadline."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``spawn_server("--max-clients", "3", env={...}, cwd=..., wait=True)``.

    Runs in an empty temporary directory (no config.env) with TCP_UPPER_* variables removed;
    ``--host 127.0.0.1 --port 0`` are added unless given. With ``wait=True`` (default) it returns
    once the listening line is logged, with ``.port`` set.
    """
    started: list[ServerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              wait: bool = True) -> ServerProcess:
        argv = list(args)
        if "--port" not in argv:
            argv += ["--port", "0"]
        if "--host" not in argv:
            argv += ["--host", "127.0.0.1"]
        process = ServerProcess(argv, cwd or tmp_path, clean_env(**(env or {})))
        started.append(process)
        if wait:
            process.wait_listening()
        return process

    yield spawn
    for process in started:
        process.stop()
