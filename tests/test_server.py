"""docs/PROTOCOL.md §1 end to end: a real server on a loopback socket, port chosen by the kernel.

Every read is bounded by the client socket's timeout (conftest.DEADLINE); replies are read by
exact length because TCP has no message boundaries. Waits are on data or on a condition, never
on a fixed sleep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DEADLINE,
    ServerProcess,
    ThreadedServer,
    clean_env,
    connect,
    peer_name,
    recv_exactly,
    recv_until_closed,
    reset,
    wait_until,
)

from tcp_upper.errors import ServerStartError
from tcp_upper.protocol import HOLD_BACK_SECONDS
from tcp_upper.server import Reason, make_server

LOGGER = "tcp_upper.server"
NFD_COMMAND = unicodedata.normalize("NFD", "DESCONEXIÓN")


def exchange(sock: socket.socket, data: bytes, expected: bytes) -> None:
    """Send *data*; the reply must be exactly *expected* (read by length)."""
    sock.sendall(data)
    assert recv_exactly(sock, len(expected)) == expected


def recv_at_least(sock: socket.socket, size: int) -> bytes:
    """Read until *size* bytes arrived (large transfers: a bytearray, no quadratic copies)."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(1 << 20, size - len(data)))
        if not chunk:
            pytest.fail(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    """Run *target* in a daemon thread; exceptions are collected for the test to re-raise."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def join(thread: threading.Thread, errors: list[BaseException]) -> None:
    thread.join(DEADLINE)
    assert not thread.is_alive(), "helper thread did not finish in time"
    if errors:
        raise errors[0]


def disconnect_records(caplog: pytest.LogCaptureFixture, peer: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and f"{peer} desconectado" in r.getMessage()]


# --- PROTOCOL.md §1, row by row ------------------------------------------------------------

ROWS = {
    "LF line": (b"hola servidor\n", b"HOLA SERVIDOR\n"),
    "CRLF line": (b"hola servidor\r\n", b"HOLA SERVIDOR\r\n"),
    "no newline": (b"hola servidor", b"HOLA SERVIDOR"),
    "enye": ("ñandú\n".encode(), "ÑANDÚ\n".encode()),
    "sharp s": ("straße\n".encode(), b"STRASSE\n"),
    "not utf-8": (b"caf\xe9 \xff\xfe \xed\xa0\x80 \xc0\xaf x\xc3\n",
                  b"CAF\xe9 \xff\xfe \xed\xa0\x80 \xc0\xaf X\xc3\n"),
    "empty line": (b"\n", b"\n"),
    "empty CRLF line": (b"\r\n", b"\r\n"),
    "no DESCONEXION": (b"no DESCONEXION\n", b"NO DESCONEXION\n"),
    "DESCONEXIONES": (b"DESCONEXIONES\n", b"DESCONEXIONES\n"),
    "several lines at once": (b"uno\ndos\r\ntres", b"UNO\nDOS\r\nTRES"),
}


@pytest.mark.parametrize(("sent", "expected"), ROWS.values(), ids=ROWS.keys())
def test_each_input_gets_its_upper_case_reply(server: ThreadedServer, sent: bytes,
                                              expected: bytes) -> None:
    with connect(server.port) as sock:
        exchange(sock, sent, expected)
        # Nothing else was sent, and the connection is still served.
        exchange(sock, b"\nsigo\n", b"\nSIGO\n")


def test_hola_without_newline_comes_back_in_a_single_recv(server: ThreadedServer) -> None:
    # The hand-written client: send("hola"), then one recv(1024) must hold the whole answer.
    with connect(server.port) as sock:
        sock.sendall(b"hola")
        assert sock.recv(1024) == b"HOLA"


def test_a_character_split_across_two_tcp_reads_is_still_right(server: ThreadedServer) -> None:
    with connect(server.port) as sock:
        exchange(sock, b"a\xc3", b"A")  # the server has read the half character
        exchange(sock, b"\xb1and\xc3", "ÑAND".encode())
        exchange(sock, b"\xba\n", "Ú\n".encode())


def test_end_of_stream_flushes_replies_then_closes(server: ThreadedServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"uno\ndos\ntres")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b"UNO\nDOS\nTRES"


def test_end_of_stream_flushes_a_held_line_start(server: ThreadedServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"uno\nDESCON")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b"UNO\nDESCON"


# --- DESCONEXION ---------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    b"DESCONEXION\n", b"desconexion\r\n", b"  DesConExion\t\n", "DESCONEXIÓN\n".encode(),
    NFD_COMMAND.encode() + b"\r\n", " desconexión \r\n".encode(),
])
def test_desconexion_delivers_earlier_replies_sends_nothing_for_it_and_closes(
        server: ThreadedServer, line: bytes) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"hola servidor\n" + line + b"esto se descarta\n")
        assert recv_until_closed(sock) == b"HOLA SERVIDOR\n"


@pytest.fixture
def long_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold-back pause far beyond DEADLINE: a slow test thread cannot trigger it by accident
    (and only the end of stream or the next bytes can decide a held line start)."""
    monkeypatch.setattr("tcp_upper.server.HOLD_BACK_SECONDS", 10 * DEADLINE)


@pytest.mark.usefixtures("long_pause")
def test_desconexion_split_across_tcp_reads_still_closes(server: ThreadedServer) -> None:
    with connect(server.port) as sock:
        exchange(sock, b"hola\nDESCON", b"HOLA\n")
        sock.sendall(b"EXION\n")
        assert recv_until_closed(sock) == b""


@pytest.mark.usefixtures("long_pause")
def test_desconexion_then_es_in_a_later_read_is_ordinary_text(server: ThreadedServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"DESCONEXION")
        exchange(sock, b"ES\n", b"DESCONEXIONES\n")


def test_many_replies_before_desconexion_arrive_intact(server: ThreadedServer) -> None:
    lines = "".join(f"linea {i} ñ\n" for i in range(2000)).encode()
    with connect(server.port) as sock:
        sock.sendall(lines + b"DESCONEXION\n")
        assert recv_until_closed(sock) == lines.decode().upper().encode()


def test_desconexion_is_an_orderly_close_even_if_the_client_keeps_writing(
        server: ThreadedServer) -> None:
    with connect(server.port) as sock:
        # The server reads the command with bytes still queued behind it.
        sock.sendall(b"hola\nDESCONEXION\n" + b"x" * 200_000)
        assert recv_exactly(sock, 5) == b"HOLA\n"
        # It keeps writing after the command: the server half-closed and drains.
        for _ in range(20):
            sock.sendall(b"y" * 1000)
        assert sock.recv(1024) == b""  # FIN, not ConnectionResetError
        sock.sendall(b"todavia\n")  # still accepted: the server's side is drained, not reset
        sock.shutdown(socket.SHUT_WR)


def test_a_bare_desconexion_closes_after_the_hold_back_pause(server: ThreadedServer,
                                                             server_log) -> None:
    with connect(server.port) as sock:
        exchange(sock, b"hola\nDESCONEXION", b"HOLA\n")
        # Nothing more is sent: the pause (HOLD_BACK_SECONDS) decides it.
        assert sock.recv(1024) == b""
        peer = peer_name(sock)
    wait_until(lambda: disconnect_records(server_log, peer), what="the disconnect log line")
    assert disconnect_records(server_log, peer) == [f"Cliente {peer} desconectado: "
                                                    f"{Reason.COMMAND}"]


@pytest.mark.usefixtures("long_pause")
def test_a_bare_desconexion_closes_at_once_on_half_close(server: ThreadedServer) -> None:
    # With the long pause, only the end of stream can close the connection in time.
    with connect(server.port) as sock:
        exchange(sock, b"hola\n", b"HOLA\n")
        sock.sendall(b"DESCONEXION")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b""


def test_a_held_line_start_is_released_after_the_pause(server: ThreadedServer) -> None:
    assert HOLD_BACK_SECONDS < DEADLINE
    with connect(server.port) as sock:
        sock.sendall(b"hola\nDESCON")
        # Waiting on the data: DESCON arrives only once the pause has released it.
        assert recv_exactly(sock, 11) == b"HOLA\nDESCON"
        # The rest of that line is ordinary text; the next line is judged afresh.
        exchange(sock, b"EXION\n", b"EXION\n")
        sock.sendall(b"DESCONEXION\n")
        assert recv_until_closed(sock) == b""


def test_desconexion_closes_that_client_only(server: ThreadedServer) -> None:
    with connect(server.port) as first, connect(server.port) as second:
        exchange(first, b"uno\n", b"UNO\n")
        exchange(second, b"dos\n", b"DOS\n")
        first.sendall(b"DESCONEXION\n")
        assert recv_until_closed(first) == b""
        first.close()  # ends the server's drain at once
        exchange(second, b"sigo aqui\n", b"SIGO AQUI\n")
        wait_until(lambda: server.server.active_clients == 1, what="one client left")
        with connect(server.port) as third:
            exchange(third, b"tres\n", b"TRES\n")
            exchange(second, b"y yo\n", b"Y YO\n")


# --- many clients --------------------------------------------------------------------------------

def test_concurrent_clients_get_their_own_replies_only(server: ThreadedServer) -> None:
    clients, rounds = 20, 50
    start = threading.Barrier(clients, timeout=DEADLINE)

    def talk(number: int) -> Callable[[], None]:
        def run() -> None:
            with connect(server.port) as sock:
                start.wait()
                for turn in range(rounds):
                    message = f"cliente {number} ñ mensaje {turn}\n".encode()
                    if turn % 3 == 0:  # sometimes in two writes
                        sock.sendall(message[:5])
                        message = message[5:]
                        expected = f"cliente {number} ñ mensaje {turn}\n".upper().encode()
                        sock.sendall(message)
                        assert recv_exactly(sock, len(expected)) == expected
                    else:
                        exchange(sock, message, message.decode().upper().encode())
                sock.sendall(b"DESCONEXION\n")
                assert recv_until_closed(sock) == b""
        return run

    workers = [in_thread(talk(number)) for number in range(clients)]
    for thread, errors in workers:
        join(thread, errors)
    wait_until(lambda: server.server.active_clients == 0, what="every client gone")


def test_a_reset_client_is_forgotten_without_a_traceback(server: ThreadedServer,
                                                         server_log) -> None:
    with connect(server.port) as other:
        exchange(other, b"antes\n", b"ANTES\n")
        victim = connect(server.port)
        peer = peer_name(victim)
        exchange(victim, b"hola\n", b"HOLA\n")
        victim.sendall(b"a medio camino " * 1000)  # replies left unread
        reset(victim)
        wait_until(lambda: disconnect_records(server_log, peer), what="the reset log line")
        exchange(other, b"despues\n", b"DESPUES\n")
        with connect(server.port) as newcomer:
            exchange(newcomer, b"nuevo\n", b"NUEVO\n")
    assert disconnect_records(server_log, peer) == [f"Cliente {peer} desconectado: "
                                                    f"{Reason.RESET}"]
    assert not [r for r in server_log.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "Traceback" not in server_log.text


def test_a_line_of_more_than_10_mb_without_newline_streams_through(server: ThreadedServer) -> None:
    pattern = "abc ñandú straße desconexion xyz\t".encode()
    payload = pattern * (10 * 1024 * 1024 // len(pattern) + 7)
    expected = payload.decode().upper().encode()
    with connect(server.port) as sock:
        writer, errors = in_thread(lambda: sock.sendall(payload))
        received = recv_at_least(sock, len(expected))
        join(writer, errors)
        assert len(received) == len(expected)
        assert received == expected
        exchange(sock, b"\nfin\n", b"\nFIN\n")


# --- limits --------------------------------------------------------------------------------------

def test_beyond_max_clients_a_connection_gets_one_error_line_and_is_closed(
        start_server: Callable[..., ThreadedServer]) -> None:
    running = start_server(max_clients=2)
    with connect(running.port) as first, connect(running.port) as second:
        exchange(first, b"uno\n", b"UNO\n")
        exchange(second, b"dos\n", b"DOS\n")
        for send_first in (False, True):
            with connect(running.port) as third:
                if send_first:  # a client that talks before reading still gets the line
                    third.sendall(b"hola\n")
                refusal = recv_until_closed(third)
            assert refusal.startswith(b"ERROR")
            assert refusal.endswith(b"\n")
            assert refusal.count(b"\n") == 1
        exchange(first, b"sigo\n", b"SIGO\n")
        exchange(second, b"yo tambien\n", b"YO TAMBIEN\n")
        first.sendall(b"DESCONEXION\n")
        assert recv_until_closed(first) == b""
        first.close()
        wait_until(lambda: running.server.active_clients == 1, what="a free place")
        with connect(running.port) as fourth:
            exchange(fourth, b"cuatro\n", b"CUATRO\n")
        exchange(second, b"fin\n", b"FIN\n")


def test_idle_timeout_closes_a_silent_client(start_server: Callable[..., ThreadedServer],
                                             server_log) -> None:
    running = start_server(idle_timeout=0.3)
    with connect(running.port) as sock:
        exchange(sock, b"hola\n", b"HOLA\n")
        peer = peer_name(sock)
        assert recv_until_closed(sock) == b""  # orderly: end of stream
    wait_until(lambda: disconnect_records(server_log, peer), what="the idle log line")
    assert disconnect_records(server_log, peer) == [
        f"Cliente {peer} desconectado: {Reason.IDLE.format(seconds=0.3)}"]


def test_idle_timeout_spares_a_client_that_keeps_talking(
        start_server: Callable[..., ThreadedServer]) -> None:
    idle = 0.5
    running = start_server(idle_timeout=idle)
    with connect(running.port) as sock:
        # Talking without a pause for three idle timeouts: the timeout counts silence, not
        # the connection's age. Bounded by the count as well as the clock.
        began = time.monotonic()
        for turn in range(1_000_000):
            exchange(sock, b"sigo %d\n" % turn, b"SIGO %d\n" % turn)
            if time.monotonic() - began > 3 * idle:
                break
        exchange(sock, b"fin\n", b"FIN\n")


def test_a_client_that_stops_reading_is_closed_after_the_write_timeout(
        start_server: Callable[..., ThreadedServer], server_log) -> None:
    running = start_server(write_timeout=0.3)
    sock = connect(running.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer = peer_name(sock)
    chunk = b"x" * 65536
    try:
        for _ in range(4096):  # bounded: 256 MiB at most; the server gives up long before
            sock.sendall(chunk)
    except OSError:
        pass  # the server closed with our bytes unread: a reset is expected here
    finally:
        sock.close()
    wait_until(lambda: disconnect_records(server_log, peer), what="the stalled log line")
    assert disconnect_records(server_log, peer) == [
        f"Cliente {peer} desconectado: {Reason.STALLED.format(seconds=0.3)}"]
    with connect(running.port) as other:
        exchange(other, b"hola\n", b"HOLA\n")


def test_make_server_on_a_port_in_use_raises_one_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServerStartError) as raised:
            make_server("127.0.0.1", port)
    assert isinstance(raised.value, OSError)  # callers catching OSError still do
    assert f"El puerto {port} ya está en uso" in str(raised.value)
    assert "--port" in str(raised.value)


# --- the server process --------------------------------------------------------------------------

def test_server_process_logs_listening_connect_and_each_disconnect_reason(
        spawn_server: Callable[..., ServerProcess]) -> None:
    proc = spawn_server()
    assert proc.port > 0
    listening = proc.wait_for_log(r"escuchando en \S+")
    assert f"127.0.0.1:{proc.port}" in listening.string

    by_command = connect(proc.port)
    exchange(by_command, b"hola\n", b"HOLA\n")
    by_command.sendall(b"DESCONEXION\n")
    assert recv_until_closed(by_command) == b""

    by_eof = connect(proc.port)
    exchange(by_eof, b"hola\n", b"HOLA\n")
    by_eof.shutdown(socket.SHUT_WR)
    assert recv_until_closed(by_eof) == b""

    by_reset = connect(proc.port)
    exchange(by_reset, b"hola\n", b"HOLA\n")

    peers = {name: peer_name(sock) for name, sock in
             (("command", by_command), ("eof", by_eof), ("reset", by_reset))}
    reset(by_reset)
    by_command.close()
    by_eof.close()

    for peer in peers.values():
        proc.wait_for_log(rf"Cliente {re.escape(peer)} conectado")
    for name, reason in (("command", Reason.COMMAND), ("eof", Reason.EOF),
                         ("reset", Reason.RESET)):
        line = proc.wait_for_log(rf"Cliente {re.escape(peers[name])} desconectado: .*").string
        assert line.endswith(f"desconectado: {reason}"), line
        assert re.search(r"\d\d:\d\d:\d\d", line), f"no timestamp in {line!r}"
    assert "Traceback" not in proc.log
    proc.signal()
    assert proc.wait() == 0


def _ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback (::1) here")
def test_server_listens_on_ipv6_loopback(spawn_server: Callable[..., ServerProcess]) -> None:
    proc = spawn_server("--host", "::1")
    # Read the port here: the listening line is "... escuchando en [::1]:PORT ...".
    port = int(proc.wait_for_log(r"escuchando en \[::1\]:(\d+)").group(1))
    assert port > 0
    with connect(port, host="::1") as sock:
        exchange(sock, "hola ñandú\n".encode(), "HOLA ÑANDÚ\n".encode())
        sock.sendall(b"DESCONEXION\n")
        assert recv_until_closed(sock) == b""
    proc.wait_for_log(r"Cliente \[::1\]:\d+ desconectado: DESCONEXION")


def _ipv4_mapped_on_ipv6() -> bool:
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as setting:
            return setting.read().strip() == "0"
    except OSError:
        return False


@pytest.mark.skipif(not (_ipv6_loopback_available() and _ipv4_mapped_on_ipv6()),
                    reason="no IPv6 loopback, or IPv4 is not mapped onto IPv6 sockets here")
def test_server_on_the_ipv6_wildcard_serves_ipv6_and_ipv4(
        spawn_server: Callable[..., ServerProcess]) -> None:
    proc = spawn_server("--host", "::")
    port = int(proc.wait_for_log(r"escuchando en \[::\]:(\d+)").group(1))
    for host in ("::1", "127.0.0.1"):
        with connect(port, host=host) as sock:
            exchange(sock, b"hola " + host.encode() + b"\n", b"HOLA " + host.encode() + b"\n")


def _full_pipe() -> tuple[int, int, int]:
    """A pipe whose buffer is already full (read end, write end, bytes in it): the next write
    to it blocks until it is read."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    filled = 0
    with contextlib.suppress(BlockingIOError):
        for _ in range(1 << 16):  # bounded: pipe buffers are at most a few MiB
            filled += os.write(write_end, b"\0" * 4096)
    os.set_blocking(write_end, True)
    return read_end, write_end, filled


@pytest.mark.skipif(not os.path.exists("/proc/self/wchan"), reason="needs Linux /proc/PID/wchan")
def test_sigterm_while_the_listening_line_is_being_written_still_stops_the_server(
        tmp_path: Path) -> None:
    # PROTOCOL.md §4: SIGTERM -> exit 0 within 2 s. Make it deterministic: stderr is a full
    # pipe, so the server blocks inside the write of its listening line; signal it there.
    read_end, write_end, filled = _full_pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcp_upper.server", "--host", "127.0.0.1", "--port", "0",
         "--max-clients", "2"],
        cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=write_end)
    os.close(write_end)
    output = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 65536):
            output.extend(chunk)

    try:
        def blocked_writing() -> bool:  # any thread: the log is written by a background one
            tasks = Path(f"/proc/{proc.pid}/task").glob("*/wchan")
            return any("pipe_write" in wchan.read_text() for wchan in tasks)

        wait_until(lambda: proc.poll() is not None or blocked_writing(),
                   what="the server blocked writing its first log line")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        reader, errors = in_thread(drain)
        try:
            code = proc.wait(3.0)  # PROTOCOL.md §4: within 2 s
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"no exit after SIGTERM; stderr: {output[filled:].decode()!r}"
        join(reader, errors)
        log = output[filled:].decode()
        assert "Servidor parado" in log
        assert "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)
        os.close(read_end)
