"""--workers N: processes sharing the port with SO_REUSEPORT, supervised by the parent."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import DEADLINE, connect, recv_exactly, wait_until

pytestmark = pytest.mark.skipif(not hasattr(__import__("socket"), "SO_REUSEPORT"),
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


def test_sigterm_stops_every_worker_in_order(spawn_server) -> None:
    server = spawn_server("--workers", "2")
    workers = wait_until(lambda: len(children(server.pid)) == 2 and children(server.pid))
    idle = [connect(server.port) for _ in range(10)]
    try:
        for sock in idle:  # each is being served (its handler thread is running)
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"X"
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert time.monotonic() - started < 2.5  # SPEC: within 2 s; margin for a busy CI
        for sock in idle:
            assert sock.recv(16) == b""  # orderly end of stream, not a reset
    finally:
        for sock in idle:
            sock.close()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()
    assert "Traceback" not in server.log


def test_workers_report_a_port_in_use(spawn_server) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = spawn_server("--workers", "2", "--port", str(port), wait=False)
        assert server.wait(DEADLINE) == 1
    assert f"El puerto {port} ya está en uso" in server.log
    assert "Traceback" not in server.log
