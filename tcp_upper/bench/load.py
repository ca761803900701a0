"""One process's share of the load: non-blocking sockets driven by one thread with selectors."""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from .histogram import LatencyHistogram
from .payloads import PAYLOADS, Batch, build_batch, cycle_lines

#: Error kinds, in report order, and how a user reads them.
ERROR_KINDS = {
    "mismatch": "respuesta incorrecta",
    "eof": "cierre prematuro",
    "reset": "conexión reiniciada",
    "timeout": "sin respuesta a tiempo",
    "extra": "bytes de más al cerrar",
    "socket": "error de socket",
}

#: Seconds between progress reports (and the live line on a terminal).
PROGRESS_INTERVAL = 1.0
#: Seconds between scans for expired deadlines: a scan costs a few µs per connection.
DEADLINE_SCAN_INTERVAL = 0.25
#: Longest wait for the server's close after our half-close: waiting longer measures nothing.
CLOSE_WAIT = 2.0
#: Largest single recv(): recv(n) allocates n bytes up front, even for a short read.
RECV_MAX = 256 * 1024



@dataclass
class Target:
    """Where and how to send load; picklable, so every worker process gets the same plan."""

    label: str
    conns: int
    family: int
    sockaddr: tuple[Any, ...]
    depth: int
    size: int
    duration: float
    timeout: float
    payload: str = "ascii"  # a name in PAYLOADS, ignored when payload_lines is set
    payload_lines: tuple[bytes, ...] | None = None  # --payload-file

    def batch_for(self, conn_id: int) -> Batch:
        """The batch connection *conn_id* sends every round, with its expected reply."""
        maker = cycle_lines(self.payload_lines) if self.payload_lines else PAYLOADS[self.payload]
        return build_batch(maker, conn_id, self.depth, self.size)


@dataclass
class WorkerResult:
    """What one process measured; results of several processes merge with :meth:`merge`."""

    conns: int = 0
    connect_s: float = 0.0
    elapsed_s: float = 0.0
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: Per connection, from the start of its connect to the first byte of its first reply.
    first_reply: LatencyHistogram = field(default_factory=LatencyHistogram)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def merge(self, other: WorkerResult) -> None:
        """Fold *other* in; processes run at the same time, so durations take the maximum."""
        self.conns += other.conns
        self.connect_s = max(self.connect_s, other.connect_s)
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.requests += other.requests
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.latency.merge(other.latency)
        self.first_reply.merge(other.first_reply)
        for kind, times in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + times
        if self.first_error is None:
            self.first_error = other.first_error


_CONNECTING, _RUNNING, _CLOSING, _DONE = range(4)

ProgressCallback = Callable[[float, int, int], None]


class _Conn:
    """One connection's state; slots keep the per-event attribute access cheap."""

    __slots__ = ("batch", "batches", "buf", "cid", "deadline", "expected", "got", "pending",
                 "plan", "sent", "sock", "started", "state", "t0")

    def __init__(self, cid: int, sock: socket.socket, plan: Batch) -> None:
        self.cid = cid
        self.sock = sock
        self.plan = plan
        self.batch = plan.data
        self.expected = plan.expected
        self.started = time.perf_counter()  # connect began; 0.0 once the first reply came
        self.buf = bytearray()  # replies so far, when a batch's replies arrive in pieces
        self.got = 0
        self.sent = 0
        self.t0 = 0.0
        self.deadline = 0.0
        self.pending: list[tuple[int, float]] = []
        self.state = _CONNECTING
        self.batches = 0


def _show(data: bytes, limit: int = 48) -> str:
    text = repr(bytes(data[:limit]))[1:]
    return text + ("…" if len(data) > limit else "")


def describe_mismatch(plan: Batch, received: bytes) -> str:
    """Where *received* first departs from the expected reply, in words: line, byte, both."""
    expected = plan.expected
    pos = next((i for i, (a, b) in enumerate(zip(expected, received)) if a != b),
               min(len(expected), len(received)))
    unit = plan.unit_at(pos)
    start = plan.ends[unit - 1] if unit else 0
    end = plan.ends[unit]
    return (f"línea {unit + 1} del lote, byte {pos - start + 1}: se esperaba "
            f"{_show(expected[start:end])}, llegó {_show(received[start:end])}")


def error_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class LoadWorker:
    """Drives a share of the connections from one thread (one worker per process).

    Call :meth:`connect`, then :meth:`run`, and :meth:`close` in every case (it is idempotent).
    """

    def __init__(self, target: Target, conn_ids: Sequence[int]) -> None:
        self.target = target
        self.conn_ids = conn_ids
        self.result = WorkerResult(conns=len(conn_ids))
        self._sel = selectors.DefaultSelector()
        self._conns: list[_Conn] = []
        self._live = 0
        self._last_done = 0.0

    # -- connecting -------------------------------------------------------------------------

    def connect(self) -> str | None:
        """Open every connection at once (non-blocking); return ``None``, or why it failed."""
        target = self.target
        start = time.perf_counter()
        deadline = start + target.timeout
        waiting = 0
        for cid in self.conn_ids:
            try:
                sock = socket.socket(target.family, socket.SOCK_STREAM)
            except OSError as exc:
                return self._connect_failure(exc.errno, error_text(exc), cid)
            conn = _Conn(cid, sock, target.batch_for(cid))
            self._conns.append(conn)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(target.sockaddr)
            if err not in (0, errno.EINPROGRESS):
                return self._connect_failure(err, os.strerror(err), cid)
            self._sel.register(sock, selectors.EVENT_WRITE, conn)
            waiting += 1
        while waiting:
            left = deadline - time.perf_counter()
            if left <= 0:
                return self._connect_failure(errno.ETIMEDOUT,
                                             f"sin respuesta en {target.timeout:g} s", None)
            for key, _ in self._sel.select(left):
                conn = key.data
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    return self._connect_failure(err, os.strerror(err), conn.cid)
                self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
                conn.state = _RUNNING
                waiting -= 1
        self.result.connect_s = time.perf_counter() - start
        self._live = len(self._conns)
        return None

    def _connect_failure(self, err: int | None, reason: str, cid: int | None) -> str:
        if cid is None:
            opened = sum(conn.state == _RUNNING for conn in self._conns)
            where = f"{opened} de {self.target.conns} conexiones establecidas"
        else:
            where = f"conexión {cid + 1} de {self.target.conns}"
        hint = "¿está el servidor en marcha? Revise --host y --port"
        if err in (errno.EMFILE, errno.ENFILE):
            hint = "suba el límite de ficheros abiertos (ulimit -n) o baje --conns"
        elif err == errno.EADDRNOTAVAIL:
            hint = "no quedan puertos locales libres: baje --conns"
        elif err == errno.ETIMEDOUT:
            hint = ("el servidor no acepta conexiones a ese ritmo (¿cola de escucha llena?): "
                    "suba --timeout o baje --conns")
        return (f"no se puede conectar con {self.target.label}: {reason} "
                f"({where}); {hint}")

    # -- the loop -----------------------------------------------------------------------------

    def run(self, on_progress: ProgressCallback | None = None) -> WorkerResult:
        """Send load for the duration, let every connection finish its batch and close.

        *on_progress* is called about once a second with (elapsed s, requests, errors).
        """
        result = self.result
        select = self._sel.select
        start = time.perf_counter()
        end = start + self.target.duration
        self._last_done = start
        for conn in self._conns:
            self._send_batch(conn, time.perf_counter())
        next_scan = start + DEADLINE_SCAN_INTERVAL
        next_progress = start + PROGRESS_INTERVAL
        while self._live:
            now = time.perf_counter()
            events = select(max(0.0, min(next_scan, next_progress) - now))
            now = time.perf_counter()
            for key, mask in events:
                conn = key.data
                if mask & selectors.EVENT_WRITE:
                    self._on_writable(conn)
                if mask & selectors.EVENT_READ and conn.state != _DONE:
                    if conn.state == _RUNNING:
                        self._on_readable(conn, now, end)
                    else:
                        self._on_closing_readable(conn)
            if now >= next_scan:
                self._expire(now)
                next_scan = now + DEADLINE_SCAN_INTERVAL
            if now >= next_progress:
                if on_progress is not None:
                    on_progress(now - start, result.requests, result.error_count)
                next_progress += PROGRESS_INTERVAL
        result.elapsed_s = (self._last_done if result.requests else time.perf_counter()) - start
        return result

    def _send_batch(self, conn: _Conn, now: float) -> None:
        conn.t0 = now
        conn.deadline = now + self.target.timeout
        try:
            sent = conn.sock.send(conn.batch)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(conn, "reset" if isinstance(exc, ConnectionResetError) else "socket",
                       error_text(exc))
            return
        self.result.bytes_sent += sent
        conn.sent = sent
        if sent < len(conn.batch):
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _on_writable(self, conn: _Conn) -> None:
        if conn.state != _RUNNING or conn.sent >= len(conn.batch):
            return
        try:
            sent = conn.sock.send(memoryview(conn.batch)[conn.sent:])
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(conn, "reset" if isinstance(exc, ConnectionResetError) else "socket",
                       error_text(exc))
            return
        self.result.bytes_sent += sent
        conn.sent += sent
        if conn.sent == len(conn.batch):
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn: _Conn, now: float, end: float) -> None:
        expected = conn.expected
        total = len(expected)
        before = conn.got
        try:
            data = conn.sock.recv(min(total - before, RECV_MAX))
        except BlockingIOError:
            return
        except ConnectionResetError as exc:
            self._fail_partial(conn, "reset", error_text(exc))
            return
        except OSError as exc:
            self._fail_partial(conn, "socket", error_text(exc))
            return
        if not data:
            self._fail_partial(conn, "eof", "el servidor cerró la conexión")
            return
        if conn.started:
            self.result.first_reply.add(now - conn.started)
            conn.started = 0.0
        got = before + len(data)
        conn.got = got
        self.result.bytes_received += len(data)
        finished_lines = conn.plan.units_done(before, got)
        if before or got < total:
            conn.buf += data
            received: bytes | bytearray = conn.buf
        else:
            received = data  # the usual case: the whole batch's replies in one read
        if got < total:
            if finished_lines:
                conn.pending.append((finished_lines, now - conn.t0))
            return
        if received != expected:
            self._fail(conn, "mismatch", describe_mismatch(conn.plan, bytes(received)))
            return
        latency = self.result.latency
        latency.add(now - conn.t0, finished_lines)
        if before:  # the batch came in pieces: lines finished by earlier reads count too
            for lines, seconds in conn.pending:
                latency.add(seconds, lines)
            conn.pending.clear()
            conn.buf.clear()
        conn.got = 0
        conn.batches += 1
        self.result.requests += len(conn.plan.ends)
        self._last_done = now
        if now >= end:
            self._begin_close(conn, now)
        else:
            self._send_batch(conn, time.perf_counter())

    def _begin_close(self, conn: _Conn, now: float) -> None:
        conn.state = _CLOSING
        conn.deadline = now + min(self.target.timeout, CLOSE_WAIT)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish(conn)

    def _on_closing_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_MAX)
        except BlockingIOError:
            return
        except ConnectionResetError as exc:
            self._fail(conn, "reset", f"al cerrar: {error_text(exc)}")
            return
        except OSError as exc:
            self._fail(conn, "socket", f"al cerrar: {error_text(exc)}")
            return
        if data:
            self.result.bytes_received += len(data)
            self._fail(conn, "extra", f"llegó {_show(data)} sin haberlo pedido")
        else:
            self._finish(conn)

    def _expire(self, now: float) -> None:
        for conn in self._conns:
            if conn.state in (_RUNNING, _CLOSING) and conn.deadline < now:
                if conn.state == _CLOSING:
                    self._finish(conn)  # the server kept it open: nothing wrong with the replies
                else:
                    self._fail_partial(conn, "timeout",
                                       f"{self.target.timeout:g} s de espera")

    def _fail_partial(self, conn: _Conn, kind: str, reason: str) -> None:
        """The batch stopped short: wrong bytes so far explain it better than the way it ended."""
        received = bytes(conn.buf)
        if received != conn.expected[:len(received)]:
            kind, reason = "mismatch", describe_mismatch(conn.plan, received)
        else:
            reason += (f" en el lote {conn.batches + 1} (llegaron {conn.got} de "
                       f"{len(conn.expected)} bytes de respuesta)")
        self._fail(conn, kind, reason)

    def _fail(self, conn: _Conn, kind: str, reason: str) -> None:
        errors = self.result.errors
        errors[kind] = errors.get(kind, 0) + 1
        if self.result.first_error is None:
            self.result.first_error = f"conexión {conn.cid}: {ERROR_KINDS[kind]}: {reason}"
        self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        if conn.state == _DONE:
            return
        conn.state = _DONE
        self._live -= 1
        self._sel.unregister(conn.sock)
        conn.sock.close()

    def close(self) -> None:
        """Close whatever is still open (after an error or an interruption); safe to repeat."""
        for conn in self._conns:
            conn.state = _DONE
            conn.sock.close()
        self._live = 0
        self._sel.close()


