"""Fairness and stopping under hostile load: what the GIL switch interval trades.

usage: python benchmarks/fairness.py [--root DIR] [--switch-interval S] [--seconds N] [--mass N]

Three measurements against ``python -m tcp_upper.server`` of the checkout DIR (default: this
one), pinned to CPU 1 while this script runs on CPU 0:

1. bystander: 4 client processes stream ``d\\n`` lines (sending while reading, every reply
   checked) while a fifth connection sends ``ping`` every 10 ms; its round trips, p50/p99/max;
2. stop: 20 clients each send 256 KiB of ``d\\n`` lines, then SIGTERM: seconds until the server
   exits, its exit status, and whether every client got every reply before an orderly close;
3. mass leave: --mass clients are each served once, all close at once and SIGTERM follows:
   seconds until the server exits.

--switch-interval runs the server with ``tcp_upper.serving.SWITCH_INTERVAL_SECONDS`` set to S (by a
wrapper, no edit), to compare values side by side.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

LISTENING = re.compile(r"escuchando en (?:\[[^\]]+\]|[^\s:]+):(\d+)")
LINE = b"d\n"
STREAM_CHUNK = LINE * 8192  # 16 KiB per send
STOP_BYTES = 256 * 1024
DEADLINE = 60.0


def start_server(root: Path, switch: float | None) -> tuple[subprocess.Popen[bytes], int]:
    """The server on 127.0.0.1, a free port, CPU 1; returns it and its port."""
    code = ("import sys, tcp_upper.cli as c, tcp_upper.serving as s; "
            "s.SWITCH_INTERVAL_SECONDS = float(sys.argv.pop(1)); "
            "sys.exit(c.server_main(sys.argv[1:]))")
    args = ["-c", code, str(switch)] if switch is not None else ["-m", "tcp_upper.server"]
    pin = ["taskset", "-c", "1"] if (os.cpu_count() or 1) >= 2 else []
    proc = subprocess.Popen([*pin, sys.executable, *args, "--host", "127.0.0.1", "--port", "0",
                             "--max-clients", "20000"], cwd=root, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode(errors="replace")
        found = LISTENING.search(line)
        if found:
            threading.Thread(target=lambda: proc.stderr.read() if proc.stderr else b"",
                             daemon=True).start()  # keep draining its log
            return proc, int(found.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("el servidor no arrancó")


def stop_server(proc: subprocess.Popen[bytes]) -> tuple[float, int]:
    """SIGTERM; (seconds until it exited, exit status)."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    return time.monotonic() - start, status


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes we sent that the server's kernel has not acknowledged yet (SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0])


def _drain(sock: socket.socket, expected_total: int | None, result: list[int]) -> None:
    """Read replies until end of stream; each must be "D\\n" over and over."""
    got = bad = 0
    pending = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        pending += data
        whole = len(pending) - len(pending) % 2
        bad += pending[:whole] != b"D\n" * (whole // 2)
        got += whole
        pending = pending[whole:]
        if expected_total is not None and got >= expected_total:
            break
    result.extend([got + len(pending), bad + bool(pending)])


def streamer(port: int, seconds: float, queue: multiprocessing.Queue[tuple[int, int, int]]) -> None:
    """One hostile client process: stream d-lines for *seconds*, report (sent, got, bad)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    result: list[int] = []
    reader = threading.Thread(target=_drain, args=(sock, None, result))
    reader.start()
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.sendall(STREAM_CHUNK)
        sent += len(STREAM_CHUNK)
    sock.shutdown(socket.SHUT_WR)
    reader.join(DEADLINE)
    sock.close()
    queue.put((sent, result[0] if result else 0, result[1] if result else 1))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def bystander(root: Path, switch: float | None, seconds: float) -> str:
    """Measurement 1: the pinger's round trips while 4 processes stream d-lines."""
    proc, port = start_server(root, switch)
    try:
        ctx = multiprocessing.get_context("spawn")
        queue: multiprocessing.Queue[tuple[int, int, int]] = ctx.Queue()
        streamers = [ctx.Process(target=streamer, args=(port, seconds, queue)) for _ in range(4)]
        for process in streamers:
            process.start()
        pinger = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        pinger.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        time.sleep(0.5)  # let the streams get going before sampling
        rtts: list[float] = []
        end = time.monotonic() + seconds - 1.0
        while time.monotonic() < end:
            start = time.perf_counter()
            pinger.sendall(b"ping\n")
            reply = b""
            while len(reply) < 5:
                reply += pinger.recv(5 - len(reply)) or b"?" * 5
            rtts.append(time.perf_counter() - start)
            if reply != b"PING\n":
                raise SystemExit(f"respuesta incorrecta al ping: {reply!r}")
            time.sleep(0.01)
        pinger.close()
        outcomes = [queue.get(timeout=DEADLINE) for _ in streamers]
        for process in streamers:
            process.join(DEADLINE)
    finally:
        stop_server(proc)
    streamed = sum(sent for sent, _, _ in outcomes)
    right = all(sent == got and not bad for sent, got, bad in outcomes)
    ms = [r * 1000 for r in rtts]
    return (f"bystander: {len(ms)} pings, p50 {percentile(ms, 0.5):.2f} ms, p99 "
            f"{percentile(ms, 0.99):.2f} ms, max {max(ms):.2f} ms; streams "
            f"{streamed / seconds / 1e6:.1f} MB/s in all, replies {'right' if right else 'WRONG'}")


def stop_with_streams(root: Path, switch: float | None, clients: int = 20) -> str:
    """Measurement 2: SIGTERM once every client has sent STOP_BYTES of d-lines."""
    proc, port = start_server(root, switch)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
             for _ in range(clients)]
    results: list[list[int]] = [[] for _ in socks]
    readers = [threading.Thread(target=_drain, args=(sock, None, result))
               for sock, result in zip(socks, results)]
    for reader in readers:
        reader.start()
    senders = [threading.Thread(target=sock.sendall, args=(LINE * (STOP_BYTES // 2),))
               for sock in socks]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(DEADLINE)
    deadline = time.monotonic() + DEADLINE  # "have sent": acknowledged by the server's kernel
    while any(map(_unacknowledged, socks)) and time.monotonic() < deadline:
        time.sleep(0.001)
    took, status = stop_server(proc)
    for reader in readers:
        reader.join(DEADLINE)
    for sock in socks:
        sock.close()
    whole = sum(result == [STOP_BYTES, 0] for result in results)
    least = min(result[0] if result else 0 for result in results)
    return (f"stop: {clients} clients x {STOP_BYTES // 1024} KiB of d-lines, exit {status} "
            f"in {took:.2f} s after SIGTERM; {whole}/{clients} got every reply, then the close "
            f"(least answered: {least} bytes)")


def mass_leave(root: Path, switch: float | None, count: int) -> str:
    """Measurement 3: *count* clients served once, all closed, then SIGTERM."""
    proc, port = start_server(root, switch)
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        sock.sendall(b"hola\n")
        socks.append(sock)
    for sock in socks:
        if sock.recv(5) != b"HOLA\n":
            raise SystemExit("respuesta incorrecta")
    for sock in socks:
        sock.close()
    took, status = stop_server(proc)
    return f"mass leave: {count} clients closed at once, SIGTERM: exit {status} in {took:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="checkout whose server is measured (default: this one)")
    parser.add_argument("--switch-interval", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--mass", type=int, default=4000)
    args = parser.parse_args()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
    label = f"switch interval {args.switch_interval}" if args.switch_interval else "as shipped"
    print(f"{args.root} ({label})")
    print(" ", bystander(args.root, args.switch_interval, args.seconds), flush=True)
    print(" ", stop_with_streams(args.root, args.switch_interval), flush=True)
    print(" ", mass_leave(args.root, args.switch_interval, args.mass), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
