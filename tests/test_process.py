"""The server process (docs/PROTOCOL.md §4): its log, a port in use, signals, log levels and limits.

Every server here is ``python -m tcp_upper.server`` started by the ``spawn_server`` fixture (an
empty temporary directory, TCP_UPPER_* variables removed, 127.0.0.1, port 0 unless given) and
stopped by it. Clients are plain sockets whose every read is bounded by ``DEADLINE``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    DEADLINE,
    LISTENING,
    STOP_LIMIT,
    ServerProcess,
    connect,
    peer_name,
    recv_exactly,
    recv_until_closed,
    wait_until,
)

from tcp_upper import logs
from tcp_upper.config import Settings
from tcp_upper.logs import background_logging

TIMESTAMPED = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S"
)

def lines_about(process: ServerProcess, sock_peer: str, pattern: str) -> list[str]:
    regex = re.compile(rf"Cliente {re.escape(sock_peer)}\b.*{pattern}")
    return [line for line in list(process.lines) if regex.search(line)]


def count(process: ServerProcess, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(1 for line in list(process.lines) if regex.search(line))


def bytes_received(process: ServerProcess, sock_peer: str) -> int:
    """Bytes the server read from one client, from its DEBUG traffic lines."""
    return sum(int(re.search(r"(\d+) bytes recibidos", line).group(1))  # type: ignore[union-attr]
               for line in lines_about(process, sock_peer, r"bytes recibidos"))


def free_port() -> int:
    """A loopback port free right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def soft_open_files(pid: int) -> int:
    """The soft "Max open files" limit of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def stop(process: ServerProcess, signum: int = signal.SIGTERM) -> float:
    """Signal the server; assert it exits 0 within STOP_LIMIT; return how long it took."""
    started = time.monotonic()
    process.signal(signum)
    status = process.wait()
    elapsed = time.monotonic() - started
    assert status == 0, process.log
    assert elapsed < STOP_LIMIT, f"took {elapsed:.2f} s to stop"
    return elapsed


@contextlib.contextmanager
def child_open_file_limit(soft: int, hard: int) -> Iterator[None]:
    """Processes started inside this block get RLIMIT_NOFILE (*soft*, *hard*), set in the child.

    ``spawn_server`` builds its ``subprocess.Popen`` itself; wrapping Popen for the duration of
    the call is the one way to add a ``preexec_fn`` without touching the test process's limits.
    """
    real_popen = subprocess.Popen

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real_popen(*args, preexec_fn=set_limit, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", popen)
        yield


# --- listening and the log ---------------------------------------------------------------------


def test_port_zero_logs_the_real_port_once_accepting(spawn_server):
    process = spawn_server()
    # The fixture returned as soon as the line appeared: connecting right away must work.
    with connect(process.port) as sock:
        sock.sendall(b"hola")
        assert recv_exactly(sock, 4) == b"HOLA"
    assert process.port != 0
    assert f"127.0.0.1:{process.port}" in process.log
    assert count(process, LISTENING.pattern) == 1
    stop(process)


def test_every_log_line_has_a_timestamp(spawn_server):
    process = spawn_server("--log-level", "DEBUG")
    with connect(process.port) as sock:
        sock.sendall(b"hola\nDESCONEXION\n")
        assert recv_until_closed(sock) == b"HOLA\n"
    with connect(process.port) as sock:
        sock.sendall(b"adios")
        assert recv_exactly(sock, 5) == b"ADIOS"
    wait_until(lambda: count(process, "desconectado") >= 2, what="two disconnect lines")
    stop(process)
    lines = list(process.lines)
    assert len(lines) >= 8  # listening, 2x(connect, traffic, disconnect), stop
    for line in lines:
        assert TIMESTAMPED.match(line), line


def test_port_in_use_exits_1_with_one_line(spawn_server):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = spawn_server("--port", str(port), wait=False)
        assert process.wait() == 1
    lines = [line for line in process.lines if line.strip()]
    assert len(lines) == 1, process.log
    assert str(port) in lines[0]
    assert "--port" in lines[0]  # how to pick another
    assert "Traceback" not in process.log


# --- signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_stops_in_order_and_the_port_is_reusable(signum, spawn_server):
    process = spawn_server("--log-level", "DEBUG")
    port = process.port
    idle = [connect(port) for _ in range(50)]  # they never react: the server must not wait
    pending = connect(port)  # a 32 KiB reply it has not read yet
    held = connect(port)  # "des" could still become DESCONEXION: held back by the server
    late = connect(port)  # sends its line right before the signal
    clients = [*idle, pending, held, late]
    try:
        wait_until(lambda: count(process, r"conectado \(") >= len(clients),
                   what="every client accepted")
        payload = b"x" * 32768 + b"\n"
        pending.sendall(payload)
        held.sendall(b"des")
        wait_until(lambda: bytes_received(process, peer_name(pending)) == len(payload)
                   and bytes_received(process, peer_name(held)) == 3, what="the server read it all")
        late.sendall(b"hola\n")

        started = time.monotonic()
        process.signal(signum)
        # Orderly: every reply due is delivered, then end of stream (b""), never a reset.
        # These three close on end of stream, as real clients do.
        assert recv_until_closed(pending) == payload.upper()
        assert recv_until_closed(held) == b"DES"
        assert recv_until_closed(late) == b"HOLA\n"
        for sock in (pending, held, late):
            sock.close()
        for sock in idle:
            assert sock.recv(1) == b""
        status = process.wait()
        elapsed = time.monotonic() - started
        assert status == 0
        assert elapsed < STOP_LIMIT, f"took {elapsed:.2f} s to stop"
    finally:
        for sock in clients:
            sock.close()
    assert "Traceback" not in process.log
    assert count(process, r"desconectado") == len(clients)
    assert count(process, rf"Señal {signal.Signals(signum).name}: parando; 53 clientes") == 1

    again = spawn_server("--port", str(port))
    assert again.port == port
    with connect(port) as sock:
        sock.sendall(b"otra vez\n")
        assert recv_exactly(sock, 9) == b"OTRA VEZ\n"
    stop(again)


def test_signal_while_a_client_keeps_sending(spawn_server, tmp_path):
    process = spawn_server()
    sock = connect(process.port)
    # The sending half of the client is another process writing as fast as it can (no GIL
    # shared with the reading half here), like a client streaming a big file.
    writer = subprocess.Popen(
        [sys.executable, "-c", "import os\nwhile True: os.write(1, b'b' * 65536)"],
        stdout=sock.fileno(), stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    error: OSError | None = None
    try:
        received = 0
        while received < 1 << 20:  # the stream flows both ways
            data = sock.recv(1 << 20)
            assert data, "closed before the signal"
            received += len(data)
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        try:
            while data := sock.recv(1 << 16):
                assert not data.strip(b"B"), "only upper-cased bytes come back"
                assert time.monotonic() - started < DEADLINE, "no end of stream"
        except OSError as exc:
            error = exc
        # End of stream seen: the client stops writing and half-closes, as a client would.
        writer.kill()
        writer.wait(DEADLINE)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        status = process.wait()
        elapsed = time.monotonic() - started
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(DEADLINE)
        sock.close()
    assert error is None, f"a reset instead of an end of stream: {error!r}"
    # The server's own account: no client it had to cut off when the grace ran out.
    assert " WARNING " not in process.log, process.log
    assert status == 0
    assert elapsed < STOP_LIMIT, f"took {elapsed:.2f} s to stop"


# Regression: the stop used to be an exception raised from the signal handler; landing inside
# socketserver's process_request it was swallowed (logged as "Error inesperado") and, with both
# signals already ignored, the server never stopped.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_a_burst_of_connections(signum, spawn_server):
    process = spawn_server()
    done = threading.Event()
    connects = [0] * 4  # per thread: no shared counter to lock

    def burst(slot: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while not done.is_set() and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", process.port), timeout=1):
                    connects[slot] += 1
            except OSError:
                if process.proc.poll() is not None:
                    return

    threads = [threading.Thread(target=burst, args=(slot,), daemon=True) for slot in range(4)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(connects) >= 200, what="a burst of connections")
        started = time.monotonic()
        process.signal(signum)
        status = process.wait(timeout=STOP_LIMIT)  # kills it and fails if it does not stop
        elapsed = time.monotonic() - started
    finally:
        done.set()
        for thread in threads:
            thread.join(DEADLINE)
    assert status == 0
    assert elapsed < STOP_LIMIT
    assert "Traceback" not in process.log


# --- log levels --------------------------------------------------------------------------------


def test_debug_shows_traffic(spawn_server):
    process = spawn_server("--log-level", "DEBUG")
    with connect(process.port) as sock:
        sock.sendall(b"hola\n")
        assert recv_exactly(sock, 5) == b"HOLA\n"
        me = peer_name(sock)
        wait_until(lambda: lines_about(process, me, r"\b5 (bytes )?enviados"),
                   what="a DEBUG line for the 5 bytes sent")
        assert lines_about(process, me, r"\b5 bytes recibidos")
        assert all(" DEBUG " in line for line in lines_about(process, me, "bytes"))
    stop(process)


def test_info_one_connect_and_one_disconnect_line_per_client(spawn_server):
    process = spawn_server()  # INFO is the default
    command, eof, reset = connect(process.port), connect(process.port), connect(process.port)
    peers = {name: peer_name(sock) for name, sock in
             (("command", command), ("eof", eof), ("reset", reset))}
    try:
        for sock in (command, eof, reset):
            sock.sendall(b"hola\n")
            assert recv_exactly(sock, 5) == b"HOLA\n"
        command.sendall(b"DESCONEXION\n")
        assert recv_until_closed(command) == b""
        eof.shutdown(socket.SHUT_WR)
        assert recv_until_closed(eof) == b""
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        for sock in (command, eof, reset):
            sock.close()  # the last one with a reset (linger 0)
    wait_until(lambda: count(process, "desconectado") >= 3, what="three disconnect lines")

    reasons = {"command": "DESCONEXION", "eof": "fin", "reset": "reinici"}
    for name, sock_peer in peers.items():
        assert len(lines_about(process, sock_peer, r"conectado \(")) == 1, process.log
        disconnects = lines_about(process, sock_peer, r"desconectado")
        assert len(disconnects) == 1, process.log
        assert reasons[name] in disconnects[0]
    assert "bytes" not in process.log  # no traffic lines at INFO
    assert "hola" not in process.log.lower()  # never payloads at INFO
    stop(process)
    assert "Traceback" not in process.log


def test_idle_timeout_is_logged_as_the_reason(spawn_server):
    process = spawn_server("--idle-timeout", "0.2")
    with connect(process.port) as sock:
        sock.sendall(b"hola\n")
        assert recv_exactly(sock, 5) == b"HOLA\n"
        me = peer_name(sock)
        assert recv_until_closed(sock) == b""  # closed by the server after 0.2 s of silence
    wait_until(lambda: lines_about(process, me, "desconectado"), what="the disconnect line")
    [line] = lines_about(process, me, "desconectado")
    assert "inactiv" in line and "0.2" in line
    stop(process)


def test_warning_shows_no_connect_lines(spawn_server):
    # At WARNING the listening line (INFO) is not shown, so the port is chosen here.
    port = free_port()
    process = spawn_server("--log-level", "WARNING", "--port", str(port), wait=False)

    def connected() -> socket.socket | None:
        with contextlib.suppress(ConnectionRefusedError):
            return connect(port)
        assert process.proc.poll() is None, process.log
        return None

    with wait_until(connected, what="the server accepting") as sock:
        sock.sendall(b"hola\nDESCONEXION\n")
        assert recv_until_closed(sock) == b"HOLA\n"
    stop(process)
    assert "conectado" not in process.log
    assert not re.search(r" (INFO|DEBUG) ", process.log)


# --- limits ------------------------------------------------------------------------------------


def test_max_clients_from_the_command_line(spawn_server):
    process = spawn_server("--max-clients", "2")
    first, second = connect(process.port), connect(process.port)
    try:
        for sock in (first, second):
            sock.sendall(b"dentro\n")
            assert recv_exactly(sock, 7) == b"DENTRO\n"  # both admitted
        with connect(process.port) as third:
            refusal = recv_until_closed(third)
        assert refusal.startswith(b"ERROR")
        assert refusal.endswith(b"\n")
        assert refusal.count(b"\n") == 1
        process.wait_for_log(r"lleno")
        for sock in (first, second):  # the others are unaffected
            sock.sendall(b"sigo\n")
            assert recv_exactly(sock, 5) == b"SIGO\n"
        first.sendall(b"DESCONEXION\n")
        assert recv_until_closed(first) == b""
        first.close()  # as a client does on end of stream: the server's drain ends at once
        wait_until(lambda: count(process, "desconectado") >= 1, what="the slot freed")
        with connect(process.port) as fourth:  # a freed slot is reused
            fourth.sendall(b"nuevo\n")
            assert recv_exactly(fourth, 6) == b"NUEVO\n"
    finally:
        first.close()
        second.close()
    stop(process)


def loaded_modules(*imports: str) -> set[str]:
    """The tcp_upper modules a fresh interpreter has loaded after *imports*."""
    code = ("import sys\n" + "".join(f"import {name}\n" for name in imports)
            + "print(' '.join(m for m in sys.modules if m.startswith('tcp_upper')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=DEADLINE, check=True).stdout
    return set(out.split())


def test_the_library_never_loads_the_process_wiring():
    loaded = loaded_modules("tcp_upper.server", "tcp_upper.client", "tcp_upper.protocol")
    assert not loaded & {"tcp_upper.cli", "tcp_upper.serving", "tcp_upper.logs",
                         "tcp_upper.workers"}, loaded


def test_the_client_entry_point_does_not_load_the_server():
    loaded = loaded_modules("tcp_upper.cli", "tcp_upper.client.__main__")
    assert "tcp_upper.client" in loaded
    assert not {name for name in loaded if name.startswith("tcp_upper.server")}, loaded


def test_log_lines_count_one_client_in_the_singular(spawn_server):
    process = spawn_server("--max-clients", "1")
    assert count(process, r"escuchando en \S+ \(máximo 1 cliente\)$") == 1
    with connect(process.port) as first:
        first.sendall(b"uno\n")
        assert recv_exactly(first, 4) == b"UNO\n"
        process.wait_for_log(r"conectado \(1 activo\)$")  # the log thread may lag the reply
        with connect(process.port) as second:
            assert recv_until_closed(second) == (
                "ERROR servidor lleno (1 cliente); inténtelo más tarde\n".encode())
        process.wait_for_log(r"Servidor lleno \(1 cliente\): rechazado")
        stop(process)
    assert count(process, r"Señal SIGTERM: parando; 1 cliente conectado$") == 1


def test_open_file_soft_limit_is_raised(spawn_server):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 1024
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room above {low}")
    # Start the server with the usual low soft limit and the hard limit of this machine.
    with child_open_file_limit(low, hard):
        process = spawn_server()
    raised = soft_open_files(process.pid)
    assert raised > low
    default_max_clients = Settings().max_clients
    wanted = default_max_clients if hard == resource.RLIM_INFINITY else min(hard,
                                                                            default_max_clients)
    assert raised >= wanted
    with connect(process.port) as sock:
        sock.sendall(b"ok\n")
        assert recv_exactly(sock, 3) == b"OK\n"
    stop(process)


def test_warns_when_max_clients_exceeds_the_hard_limit(spawn_server):
    with child_open_file_limit(256, 256):
        process = spawn_server("--max-clients", "1000")
    warnings = [line for line in process.lines if " WARNING " in line]
    assert len(warnings) == 1, process.log
    assert "256" in warnings[0] and "1000" in warnings[0]
    assert soft_open_files(process.pid) == 256
    with connect(process.port) as sock:  # it still starts and serves
        sock.sendall(b"ok\n")
        assert recv_exactly(sock, 3) == b"OK\n"
    stop(process)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_repeated_ctrl_c_stops_once_without_traceback(workers, spawn_server):
    # An impatient user presses Ctrl-C again while the server is stopping: the later ones
    # must not surface as a KeyboardInterrupt in whatever thread they land on.
    process = spawn_server("--workers", workers)
    with connect(process.port) as busy:  # just talked: the stop drains it for a while
        busy.sendall(b"hola\n")
        assert recv_exactly(busy, 5) == b"HOLA\n"
        process.signal(signal.SIGINT)
        process.wait_for_log(r"Señal SIGINT: parando")
        for _ in range(3):
            process.signal(signal.SIGINT)
        assert process.wait() == 0
    assert "Traceback" not in process.log
    assert "KeyboardInterrupt" not in process.log
    assert "Servidor parado" in process.log


# --- the log writer (in process: tcp_upper.cli.background_logging) ---------------------------

class _GatedStream(io.StringIO):
    """A stderr whose write() waits until the test opens the gate: a reader that stalls."""

    def __init__(self) -> None:
        super().__init__()
        self.writing, self.gate = threading.Event(), threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.gate.wait(DEADLINE), "the test never opened the gate"
        return super().write(text)


@pytest.fixture
def quiet_root_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let background_logging take over the root logger; put it back afterwards."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(logging, "raiseExceptions", logging.raiseExceptions)


@pytest.mark.usefixtures("quiet_root_logger")
def test_log_lines_past_the_bound_are_dropped_then_counted(monkeypatch: pytest.MonkeyPatch):
    # Lines go out in order, in batches; while the writer is stuck, lines past the bound are
    # dropped (memory stays bounded) and one last line says how many.
    stream = _GatedStream()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(logs, "LOG_QUEUE_LINES", 3)
    log = logging.getLogger("tcp_upper.test")
    with background_logging("INFO", exit_seconds=DEADLINE) as writer:
        log.info("primera")
        assert stream.writing.wait(DEADLINE)  # the writer holds it, stuck in write()
        for number in range(5):
            log.info("línea %d", number)
        stream.gate.set()
    assert writer.written
    lines = [line.split(" ", 2)[2] for line in stream.getvalue().splitlines()]
    assert lines == ["INFO primera", "INFO línea 0", "INFO línea 1", "INFO línea 2",
                     "WARNING 2 líneas del registro se descartaron: se escribían más despacio "
                     "de lo que llegaban"]


@pytest.mark.usefixtures("quiet_root_logger")
def test_log_lines_are_all_written_at_exit_when_none_was_dropped(
        monkeypatch: pytest.MonkeyPatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    log = logging.getLogger("tcp_upper.test")
    with background_logging("INFO", exit_seconds=DEADLINE) as writer:
        for number in range(2000):
            log.info("línea %d", number)
    assert writer.written
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [f"línea {n}" for n in range(2000)]
    assert all(TIMESTAMPED.match(line) for line in lines)
