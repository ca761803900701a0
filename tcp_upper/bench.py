"""``tcp-upper-bench``: a closed-loop load generator for a tcp_upper server that is already running.

How it measures, and why:

- **Closed loop.** Each connection sends ``--depth`` lines back to back, waits until the replies
  to all of them have arrived, checks every byte, and only then sends the next batch. Throughput
  is what the server sustains for that many clients of that shape; latency is what they see.
- **Round trip of a line** = from sending its batch to the arrival of the last byte of its reply.
- **The tool must not be the bottleneck it measures.** Per process, one thread drives every
  connection with non-blocking sockets and :mod:`selectors`; payloads and their expected replies
  are built once per connection; a batch is checked with one ``bytes ==``; latencies go into a
  fixed-size log-linear histogram (no list growing with the run). ``--processes`` spreads the
  connections over several such processes and merges their results.
- **TCP has no message boundaries.** Bytes are accumulated until the whole batch has arrived;
  a read may hold part of a line or several lines.
- **Everything is bounded.** Each connect, batch and close has a deadline (``--timeout``), so a
  stuck server ends the run with an error instead of hanging it.
- **Closing.** After ``--duration`` each connection finishes its batch, then half-closes
  (``shutdown(SHUT_WR)``: end of stream, which the server answers by closing) and waits at most
  :data:`CLOSE_WAIT` seconds for that close. A byte arriving then was never asked for: an error.
  ``DESCONEXION`` is not sent; the end of stream is the cheaper orderly goodbye.

Payload: each line is ``size - 1`` lowercase ASCII letters and spaces plus ``\\n``. It starts with
``h`` and spells the connection and line number in letters, so it is never ``DESCONEXION`` nor a
line start the server would hold back, and a reply sent to the wrong connection is wrong bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__, config
from .errors import SettingsError
from .system import format_address, raise_open_file_limit

PROG = "tcp-upper-bench"

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
#: Memory for the prebuilt batches and expected replies, all processes together.
MAX_PAYLOAD_BYTES = 1 << 30
#: Extra time granted to worker processes to start (spawn imports the package anew).
SPAWN_ALLOWANCE = 30.0

_FILLER = b"hola servidor "
_LETTERS = b"abcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------------------------
# Payload


def _spell(number: int) -> bytes:
    """*number* in base 26 written with a-z, so payloads carry counters yet stay letters only."""
    out = bytearray()
    while True:
        number, digit = divmod(number, 26)
        out.append(_LETTERS[digit])
        if not number:
            return bytes(out)


def make_line(conn_id: int, line_no: int, size: int) -> bytes:
    """One request line of exactly *size* bytes (``\\n`` included), unique per connection/line."""
    need = size - 1
    body = b"h" + _spell(conn_id) + b" " + _spell(line_no) + b" "
    if len(body) < need:
        body += _FILLER * (need // len(_FILLER) + 1)
    return body[:need] + b"\n"


def make_batch(conn_id: int, depth: int, size: int) -> bytes:
    """The *depth* lines a connection sends back to back; the same every round."""
    return b"".join(make_line(conn_id, line_no, size) for line_no in range(depth))


# --------------------------------------------------------------------------------------------
# Latency histogram

# Bucket of a round trip of m whole microseconds: m itself below 2 * _SUB; above, m's top
# _SUB_BITS + 1 bits plus _SUB per bit dropped, i.e. _SUB buckets per power of two.
_SUB_BITS = 7  # 128 sub-buckets per power of two: under 0.8 % relative error
_SUB = 1 << _SUB_BITS


def _bucket_value(index: int) -> float:
    """Middle of a bucket, in microseconds (the inverse of the mapping in ``add``)."""
    if index < 2 * _SUB:
        return float(index)
    shift = (index >> _SUB_BITS) - 1
    mantissa = index - (shift << _SUB_BITS)
    return (mantissa << shift) + ((1 << shift) - 1) / 2


class LatencyHistogram:
    """Round trips in log-linear microsecond buckets.

    Memory stays bounded however long the run (a few thousand buckets at most), percentiles are
    within 1 %, and histograms from several processes merge by adding counts.
    """

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_us = 0.0
        self.max_us = 0.0

    def add(self, seconds: float, times: int = 1) -> None:
        """Record *times* samples of one round trip of *seconds*."""
        micros = seconds * 1e6
        whole = int(micros)
        if whole < 2 * _SUB:
            index = whole
        else:
            shift = whole.bit_length() - _SUB_BITS - 1
            index = (shift << _SUB_BITS) + (whole >> shift)
        self.counts[index] = self.counts.get(index, 0) + times
        self.count += times
        self.total_us += micros * times
        if micros > self.max_us:
            self.max_us = micros

    def merge(self, other: LatencyHistogram) -> None:
        """Add *other*'s samples to this one."""
        for index, times in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + times
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, fraction: float) -> float:
        """The round trip (µs) that *fraction* (0..1) of the samples did not exceed; 0 if none."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(_bucket_value(index), self.max_us)
        return self.max_us

    @property
    def mean_us(self) -> float:
        return self.total_us / self.count if self.count else 0.0


# --------------------------------------------------------------------------------------------
# Load generation


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
        for kind, times in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + times
        if self.first_error is None:
            self.first_error = other.first_error


_CONNECTING, _RUNNING, _CLOSING, _DONE = range(4)

ProgressCallback = Callable[[float, int, int], None]


class _Conn:
    """One connection's state; slots keep the per-event attribute access cheap."""

    __slots__ = ("batch", "batches", "buf", "cid", "deadline", "expected", "got", "pending",
                 "sent", "sock", "state", "t0")

    def __init__(self, cid: int, sock: socket.socket, batch: bytes) -> None:
        self.cid = cid
        self.sock = sock
        self.batch = batch
        self.expected = batch.upper()
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


def describe_mismatch(expected: bytes, received: bytes, size: int) -> str:
    """Where *received* first departs from *expected*, in words: line, byte, both versions."""
    pos = next((i for i, (a, b) in enumerate(zip(expected, received)) if a != b),
               min(len(expected), len(received)))
    line = pos // size
    start = line * size
    return (f"línea {line + 1} del lote, byte {pos - start + 1}: se esperaba "
            f"{_show(expected[start:start + size])}, llegó {_show(received[start:start + size])}")


def _error_text(exc: OSError) -> str:
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
                return self._connect_failure(exc.errno, _error_text(exc), cid)
            conn = _Conn(cid, sock, make_batch(cid, target.depth, target.size))
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
                       _error_text(exc))
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
                       _error_text(exc))
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
            self._fail_partial(conn, "reset", _error_text(exc))
            return
        except OSError as exc:
            self._fail_partial(conn, "socket", _error_text(exc))
            return
        if not data:
            self._fail_partial(conn, "eof", "el servidor cerró la conexión")
            return
        got = before + len(data)
        conn.got = got
        self.result.bytes_received += len(data)
        size = self.target.size
        finished_lines = got // size - before // size
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
            self._fail(conn, "mismatch", describe_mismatch(expected, bytes(received), size))
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
        self.result.requests += self.target.depth
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
            self._fail(conn, "reset", f"al cerrar: {_error_text(exc)}")
            return
        except OSError as exc:
            self._fail(conn, "socket", f"al cerrar: {_error_text(exc)}")
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
            kind, reason = "mismatch", describe_mismatch(conn.expected, received, self.target.size)
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


# --------------------------------------------------------------------------------------------
# Several processes


def _worker_process(target: Target, conn_ids: Sequence[int], pipe: Any) -> None:
    """Body of a worker process: connect, report, wait for "go", run, report the result."""
    # The parent owns Ctrl-C and stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = LoadWorker(target, conn_ids)
    try:
        failure = worker.connect()
        pipe.send(("connected", worker.result.connect_s, failure))
        if failure is None and pipe.recv() == "go":
            result = worker.run(lambda elapsed, requests, errors: pipe.send(
                ("progress", elapsed, requests, errors)))
            pipe.send(("result", result))
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone: nobody left to report to
    finally:
        worker.close()
        pipe.close()


def _receive(pipe: Any) -> Any:
    try:
        return pipe.recv()
    except (EOFError, OSError):
        return None


def _stop_processes(procs: list[Any]) -> None:
    """Wait briefly for each worker, then terminate and finally kill any that remain."""
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2)


def _run_processes(target: Target, chunks: list[range],
                   on_progress: ProgressCallback | None) -> tuple[WorkerResult | None, str | None]:
    """Run one worker process per chunk; return the merged result, or why the run failed."""
    import multiprocessing
    from multiprocessing.connection import wait

    # spawn: a fork of a process that has threads (a test suite, an embedding program) is unsafe.
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        for index, chunk in enumerate(chunks):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_process, args=(target, chunk, theirs),
                               name=f"{PROG}-{index}", daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(ours)

        # Phase 1: the load starts only once every worker has connected, so connecting and
        # loading are measured apart and the load starts everywhere at the same moment.
        deadline = time.monotonic() + target.timeout + SPAWN_ALLOWANCE
        waiting = set(pipes)
        connect_s = 0.0
        failure: str | None = None
        while waiting and failure is None:
            left = deadline - time.monotonic()
            if left <= 0:
                failure = f"los procesos de carga no conectaron con {target.label} a tiempo"
                break
            for pipe in wait(list(waiting), left):
                waiting.discard(pipe)
                message = _receive(pipe)
                if message is None:
                    failure = "un proceso de carga terminó de forma inesperada"
                elif message[2] is not None:
                    failure = message[2]
                else:
                    connect_s = max(connect_s, message[1])
        if failure is not None:
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send("abort")
            return None, failure
        for pipe in pipes:
            pipe.send("go")

        # Phase 2: collect progress and results.
        merged = WorkerResult()
        latest = {pipe: (0, 0) for pipe in pipes}
        start = time.monotonic()
        deadline = start + target.duration + 2 * target.timeout + CLOSE_WAIT + SPAWN_ALLOWANCE
        next_progress = start + PROGRESS_INTERVAL
        waiting = set(pipes)
        while waiting:
            now = time.monotonic()
            if now >= deadline:
                return None, "los procesos de carga no terminaron a tiempo"
            for pipe in wait(list(waiting), max(0.0, min(deadline, next_progress) - now)):
                message = _receive(pipe)
                if message is None:
                    return None, "un proceso de carga terminó de forma inesperada"
                if message[0] == "progress":
                    latest[pipe] = (message[2], message[3])
                elif message[0] == "result":
                    merged.merge(message[1])
                    waiting.discard(pipe)
            now = time.monotonic()
            if now >= next_progress:
                if on_progress is not None:
                    on_progress(now - start, sum(r for r, _ in latest.values()),
                                sum(e for _, e in latest.values()))
                next_progress += PROGRESS_INTERVAL
        merged.connect_s = connect_s
        return merged, None
    finally:
        for pipe in pipes:
            pipe.close()
        _stop_processes(procs)


def run_load(target: Target, conns: int, processes: int,
             on_progress: ProgressCallback | None = None) -> tuple[WorkerResult | None, str | None]:
    """Run the benchmark: in this process when *processes* is 1, else in that many workers.

    Returns ``(result, None)`` once the run completed (its errors are in the result), or
    ``(None, reason)`` when it could not run at all, e.g. the server refused the connections.
    """
    if processes <= 1:
        worker = LoadWorker(target, range(conns))
        try:
            failure = worker.connect()
            if failure is not None:
                return None, failure
            return worker.run(on_progress), None
        finally:
            worker.close()
    share, extra = divmod(conns, processes)
    chunks, first = [], 0
    for index in range(processes):
        count = share + (index < extra)
        chunks.append(range(first, first + count))
        first += count
    return _run_processes(target, chunks, on_progress)


# --------------------------------------------------------------------------------------------
# Command line


def _int_arg(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"debe ser un número entero entre {low} y {high}: {text!r}")
        return value

    return parse


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 7 * 24 * 3600):
        raise argparse.ArgumentTypeError(f"debe ser un número de segundos positivo: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``tcp-upper-bench`` argument parser (host and port come from the shared settings)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mide un servidor tcp_upper que ya está en marcha: N conexiones envían lotes "
        "de líneas, esperan todas las respuestas, comprueban cada byte y repiten (bucle cerrado).",
        epilog="Latencia de una línea: desde el envío de su lote hasta el último byte de su "
        "respuesta. Al acabar, cada conexión termina su lote y cierra su lado de escritura. "
        "Salida: 0 todo correcto, 1 algún error, 2 argumentos no válidos.",
    )
    config.add_arguments(parser, ("host", "port"))
    # The shared help offers port 0 ("any free port"), which only makes sense for listening.
    for action in parser._actions:
        if action.dest == "port":
            action.help = f"puerto TCP del servidor (por defecto: {config.Settings().port})"
    parser.add_argument("--conns", type=_int_arg(1, 100_000), default=10, metavar="N",
                        help="conexiones simultáneas (por defecto: %(default)s)")
    parser.add_argument("--depth", type=_int_arg(1, 100_000), default=1, metavar="N",
                        help="líneas que cada conexión envía seguidas antes de esperar sus "
                        "respuestas (por defecto: %(default)s)")
    parser.add_argument("--size", type=_int_arg(2, 64 * 1024 * 1024), default=14, metavar="N",
                        help="bytes por línea, salto de línea incluido (por defecto: %(default)s)")
    parser.add_argument("--duration", type=_seconds_arg, default=3.0, metavar="SEGUNDOS",
                        help="duración de la carga (por defecto: %(default)s)")
    parser.add_argument("--processes", type=_int_arg(1, 256), default=1, metavar="N",
                        help="procesos que generan la carga, para que la herramienta no sea el "
                        "cuello de botella (por defecto: %(default)s)")
    parser.add_argument("--timeout", type=_seconds_arg, default=10.0, metavar="SEGUNDOS",
                        help="espera máxima de cada conexión, lote y cierre (por defecto: "
                        "%(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="resultado en JSON por la salida estándar (y nada más)")
    parser.add_argument("--plot", metavar="FICHERO.png",
                        help="dibuja la latencia por percentil (necesita matplotlib: "
                        "pip install 'tcp_upper[plot]')")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _load_pyplot() -> Any:
    """matplotlib.pyplot, drawing to files only; ImportError when the extra is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(path: str, latency: LatencyHistogram, title: str) -> None:
    """Save a latency-by-percentile plot (log x axis, so the tail is visible) to *path*."""
    plt = _load_pyplot()
    fractions, values = [], []
    steps = max(1, math.ceil(math.log10(max(latency.count, 10)) * 50))
    for step in range(steps + 1):
        fraction = 1 - 10 ** (-step / 50)
        if fraction > 1 - 1 / max(latency.count, 1):
            break
        fractions.append(fraction)
        values.append(latency.percentile(fraction) / 1000)
    fractions.append(1 - 1 / max(latency.count, 2))
    values.append(latency.max_us / 1000)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        ax.plot([1 / (1 - f) for f in fractions], values, drawstyle="steps-post")
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = [t for t in (1, 2, 10, 100, 1000, 10_000, 100_000, 1_000_000)
                 if t <= 1 / (1 - fractions[-1])]
        labels = {1: "0%", 2: "50%", 10: "90%", 100: "99%", 1000: "99.9%", 10_000: "99.99%",
                  100_000: "99.999%", 1_000_000: "99.9999%"}
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[t] for t in ticks])
        ax.set_xlabel("percentil")
        ax.set_ylabel("latencia (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.4)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def summarize(result: WorkerResult, *, host: str, port: int, depth: int, size: int,
              duration: float, processes: int) -> dict[str, Any]:
    """The run as a JSON-ready dict (the ``--json`` output; the table is printed from it)."""
    elapsed = result.elapsed_s or 1e-9
    latency = result.latency
    return {
        "version": __version__,
        "host": host,
        "port": port,
        "conns": result.conns,
        "depth": depth,
        "size": size,
        "duration_s": duration,
        "processes": processes,
        "connect_s": round(result.connect_s, 6),
        "elapsed_s": round(result.elapsed_s, 6),
        "requests": result.requests,
        "requests_per_s": round(result.requests / elapsed, 1),
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        "mb_per_s_sent": round(result.bytes_sent / elapsed / 1e6, 3),
        "mb_per_s_received": round(result.bytes_received / elapsed / 1e6, 3),
        "latency_us": {
            "p50": round(latency.percentile(0.50), 1),
            "p90": round(latency.percentile(0.90), 1),
            "p99": round(latency.percentile(0.99), 1),
            "max": round(latency.max_us, 1),
            "mean": round(latency.mean_us, 1),
        },
        "errors": result.error_count,
        "errors_by_kind": {kind: result.errors[kind] for kind in ERROR_KINDS
                           if result.errors.get(kind)},
        "first_error": result.first_error,
        "ok": result.error_count == 0 and result.requests > 0,
    }


def _format_latency(micros: float) -> str:
    if micros < 1000:
        return f"{micros:.0f} µs"
    if micros < 1_000_000:
        return f"{micros / 1000:.2f} ms"
    return f"{micros / 1e6:.2f} s"


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable report, in Spanish."""
    latency = summary["latency_us"]
    processes = summary["processes"]
    rows = [
        ("conexiones", f"{summary['conns']} ({processes} proceso{'s' if processes > 1 else ''})"),
        ("líneas por lote", str(summary["depth"])),
        ("bytes por línea", str(summary["size"])),
        ("tiempo en conectar todas", f"{summary['connect_s']:.3f} s"),
        ("duración medida", f"{summary['elapsed_s']:.2f} s"),
        ("peticiones", str(summary["requests"])),
        ("peticiones/s", f"{summary['requests_per_s']:.0f}"),
        ("MB/s enviados / recibidos",
         f"{summary['mb_per_s_sent']:.2f} / {summary['mb_per_s_received']:.2f}"),
        ("latencia p50", _format_latency(latency["p50"])),
        ("latencia p90", _format_latency(latency["p90"])),
        ("latencia p99", _format_latency(latency["p99"])),
        ("latencia máxima", _format_latency(latency["max"])),
    ]
    errors = str(summary["errors"])
    if summary["errors_by_kind"]:
        errors += " (" + ", ".join(f"{ERROR_KINDS[kind]}: {times}"
                                   for kind, times in summary["errors_by_kind"].items()) + ")"
    rows.append(("errores", errors))
    if summary["first_error"]:
        rows.append(("primer error", summary["first_error"]))
    width = max(len(name) for name, _ in rows)
    target = format_address((summary["host"], summary["port"]))
    head = f"{PROG} {summary['version']} contra {target}"
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])


class _ProgressLine:
    """The live line on stderr, rewritten in place; silent unless stderr is a terminal."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.width = 0

    def update(self, elapsed: float, requests: int, errors: int) -> None:
        if not self.enabled:
            return
        rate = requests / elapsed if elapsed > 0 else 0.0
        line = f"{elapsed:6.1f} s  {rate:10.0f} peticiones/s  {errors} errores"
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def main(argv: list[str] | None = None) -> int:
    """``tcp-upper-bench``: 0 when every reply was right, 1 on any error, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(status: int, message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return status

    try:
        settings = config.load_settings(args, ("host", "port"))
    except SettingsError as exc:
        return fail(2, str(exc))
    if settings.port == 0:
        return fail(2, "el puerto 0 no sirve para conectar: indique con --port el del servidor")
    processes = min(args.processes, args.conns)
    payload_bytes = 2 * args.conns * args.depth * args.size
    if payload_bytes > MAX_PAYLOAD_BYTES:
        return fail(2, f"--conns * --depth * --size necesitaría {payload_bytes // 2**20} MiB de "
                    f"memoria (máximo {MAX_PAYLOAD_BYTES // 2**20}); reduzca alguno")
    if args.plot is not None:
        try:
            _load_pyplot()
        except ImportError:
            return fail(2, "--plot necesita matplotlib, que no está instalado: "
                        "pip install 'tcp_upper[plot]'")
        if not Path(args.plot).resolve().parent.is_dir():
            return fail(2, f"--plot: no existe el directorio de {args.plot!r}")

    label = format_address((settings.host, settings.port))
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        return fail(1, f"no se puede resolver {settings.host!r} (para {label}): {reason}")
    target = Target(label=label, conns=args.conns, family=family, sockaddr=sockaddr,
                    depth=args.depth, size=args.size, duration=args.duration,
                    timeout=args.timeout)
    raise_open_file_limit(-(-args.conns // processes) + 64)

    progress = _ProgressLine(sys.stderr)
    try:
        result, failure = run_load(target, args.conns, processes, progress.update)
    except KeyboardInterrupt:
        progress.clear()
        print(f"{parser.prog}: interrumpido", file=sys.stderr)
        return 130
    progress.clear()
    if result is None:
        return fail(1, failure or "la prueba no pudo completarse")

    summary = summarize(result, host=settings.host, port=settings.port, depth=args.depth,
                        size=args.size, duration=args.duration, processes=processes)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
    else:
        print(format_table(summary))
    status = 0 if summary["ok"] else 1
    if args.plot is not None:
        title = (f"{label}: {summary['conns']} conexiones, líneas por lote: {args.depth}, "
                 f"bytes por línea: {args.size}")
        try:
            write_plot(args.plot, result.latency, title)
        except OSError as exc:
            return fail(1, f"no se puede escribir {args.plot!r}: {_error_text(exc)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
