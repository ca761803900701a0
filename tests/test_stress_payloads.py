"""Hostile payloads against the real server: lines that start like the command, in bulk.

Marked ``stress`` (CI still runs them). Every loop is bounded by a byte count or a deadline.
Latency is recorded (printed with ``-s``), never asserted: timing belongs to the benchmarks
(``benchmarks/fairness.py`` measures the same situations on pinned CPUs).
"""

from __future__ import annotations

import socket
import termios
import threading
import time
from collections.abc import Callable

import pytest
from conftest import DEADLINE, ServerProcess, connect, queued, recv_exactly, wait_until

pytestmark = pytest.mark.stress

D_LINES = b"d\n" * 8192  # 16 KiB per send


def drain_and_check(sock: socket.socket, total: int, outcome: dict[str, object]) -> None:
    """Read *total* reply bytes; they must be "D\\n" over and over. Records what happened."""
    got = 0
    wrong = False
    pending = b""
    while got < total:
        data = sock.recv(min(65536, total - got))
        if not data:
            break
        got += len(data)
        pending += data
        whole = len(pending) - len(pending) % 2
        wrong = wrong or pending[:whole] != b"D\n" * (whole // 2)
        pending = pending[whole:]
    outcome["got"], outcome["wrong"] = got, wrong or bool(pending)


def test_a_bystander_is_answered_every_time_while_four_clients_stream_d_lines(
        spawn_server: Callable[..., ServerProcess]) -> None:
    server = spawn_server()
    per_client = 2 * 1024 * 1024  # 2 MiB of "d\n" each
    streamers = [connect(server.port) for _ in range(4)]
    outcomes: list[dict[str, object]] = [{} for _ in streamers]
    readers = [threading.Thread(target=drain_and_check, args=(sock, per_client, outcome))
               for sock, outcome in zip(streamers, outcomes)]
    senders = [threading.Thread(target=sock.sendall, args=(D_LINES * (per_client // len(D_LINES)),))
               for sock in streamers]
    for thread in readers + senders:
        thread.start()
    pinger = connect(server.port)
    round_trips = []
    while any(thread.is_alive() for thread in readers) and len(round_trips) < 2000:
        start = time.perf_counter()
        pinger.sendall(b"ping\n")
        assert recv_exactly(pinger, 5) == b"PING\n"
        round_trips.append(time.perf_counter() - start)
    for thread in senders + readers:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    assert round_trips, "the streams ended before the first ping"
    assert outcomes == [{"got": per_client, "wrong": False}] * 4
    round_trips.sort()
    print(f"\nbystander: {len(round_trips)} pings while streaming, p50 "
          f"{round_trips[len(round_trips) // 2] * 1000:.2f} ms, p99 "
          f"{round_trips[int(len(round_trips) * 0.99)] * 1000:.2f} ms, max "
          f"{round_trips[-1] * 1000:.2f} ms")
    for sock in [*streamers, pinger]:
        sock.close()


def test_sigterm_with_twenty_clients_that_sent_256_kib_of_d_lines_answers_every_byte(
        spawn_server: Callable[..., ServerProcess]) -> None:
    server = spawn_server()
    size = 256 * 1024
    clients = [connect(server.port) for _ in range(20)]
    outcomes: list[dict[str, object]] = [{} for _ in clients]
    readers = [threading.Thread(target=drain_and_check, args=(sock, size + 1, outcome))
               for sock, outcome in zip(clients, outcomes)]  # + 1: read on to the close
    for thread in readers:
        thread.start()
    for sock in clients:
        sock.sendall(b"d\n" * (size // 2))
    # "Have sent": every byte is in the server's hands (acknowledged by its kernel).
    wait_until(lambda: not any(queued(c, termios.TIOCOUTQ) for c in clients),
               what="requests delivered")
    start = time.monotonic()
    server.signal()
    status = server.wait()
    took = time.monotonic() - start
    for thread in readers:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    assert status == 0
    assert outcomes == [{"got": size, "wrong": False}] * 20  # every byte, then end of stream
    assert took < 5  # the limit is 2 s; generous here on a loaded machine (figures: benchmarks)
    print(f"\nSIGTERM with 20 x 256 KiB of d-lines sent: exit 0 after {took:.2f} s")
    for sock in clients:
        sock.close()
