"""--workers N: processes sharing the port with SO_REUSEPORT, supervised by the parent."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest
from conftest import DEADLINE, connect, recv_exactly, wait_until

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"),
                                reason="the platform has no SO_REUSEPORT")


def children(pid: int) -> set[int]:
    """Live child processes of *pid* (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(child) for child in path.read_text().split()} if path.exists() else set()


def round_trip(port: int, text: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(text + b"\n")
        return recv_exactly(sock, len(text) + 1).removesuffix(b"\n")


def test_workers_share_the_port_and_all_serve(spawn_server) -> None:
    server = spawn_server("--workers", "2")
    assert "(2 procesos" in server.wait_for_log("escuchando en").string
    workers = wait_until(lambda: len(children(server.pid)) == 2 and children(server.pid))
    for number in range(40):
        text = f"cliente {number}".encode()
        assert round_trip(server.port, text) == text.upper()
    # 40 connections from different source ports all hashed to one socket: odds 2**-39.
    served_by = {int(pid) for pid in re.findall(r"\[(\d+)\] Cliente \S+ conectado", server.log)}
    assert served_by == workers
    assert server.log.count("escuchando en") == 1  # announced once, by the parent


def test_a_dead_worker_is_replaced_and_service_goes_on(spawn_server) -> None:
    server = spawn_server("--workers", "2")
    first = wait_until(lambda: len(children(server.pid)) == 2 and children(server.pid))
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(rf"El proceso {victim} terminó inesperadamente \(señal SIGKILL\)")
    replaced = wait_until(lambda: (kids := children(server.pid)) - first and len(kids) == 2
                          and kids)
    assert victim not in replaced
    for number in range(20):
        text = f"otra vez {number}".encode()
        assert round_trip(server.port, text) == text.upper()


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie waiting for its parent to collect it does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_stops_every_worker_in_order(spawn_server, signum: int) -> None:
    server = spawn_server("--workers", "2")
    workers = wait_until(lambda: len(children(server.pid)) == 2 and children(server.pid))
    idle = [connect(server.port) for _ in range(10)]
    try:
        for sock in idle:  # each is being served (its handler thread is running)
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"X"
        server.signal(signum)
        assert server.wait() == 0
        for sock in idle:
            assert sock.recv(16) == b""  # orderly end of stream, not a reset
    finally:
        for sock in idle:
            sock.close()
    assert not any(map(alive, workers))
    assert f"Señal {signal.Signals(signum).name}: parando 2 procesos" in server.log
    assert "Servidor parado" in server.log
    assert "Traceback" not in server.log


def test_workers_end_with_their_parent_even_when_it_is_killed(spawn_server) -> None:
    server = spawn_server("--workers", "2")
    workers = wait_until(lambda: len(children(server.pid)) == 2 and children(server.pid))
    with connect(server.port) as sock:  # a served client sees its server go away in order
        sock.sendall(b"hola\n")
        assert recv_exactly(sock, 5) == b"HOLA\n"
        server.kill()  # SIGKILL: the parent cannot pass anything on
        wait_until(lambda: not any(map(alive, workers)), what="every worker gone")
        assert sock.recv(16) == b""
    with socket.socket() as again:  # the port is free: a new server could listen there
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", server.port))
        again.listen()


def test_workers_report_a_port_in_use(spawn_server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = spawn_server("--workers", "2", "--port", str(port), wait=False)
        assert server.wait(DEADLINE) == 1
    assert f"El puerto {port} ya está en uso" in server.log
    assert "Traceback" not in server.log
