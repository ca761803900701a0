"""The server's log: one line per event on stderr, written by one background thread per process.

Built on ``logging.handlers.QueueHandler`` and ``QueueListener``, with three properties the
server needs (docs/OPERATIONS.md, "The log"):

- a client thread never waits for stderr: it formats its line, minus the timestamp, and
  queues it; the listener thread adds the timestamp and writes whatever is queued in one
  write() (at thousands of clients every GIL hand-off is a wait);
- memory stays bounded: past :data:`LOG_QUEUE_LINES` waiting, lines are dropped and counted,
  and one last WARNING says how many;
- a stuck stderr never hangs the exit: at the end, queued lines get what is left of the stop's
  budget, and the caller exits without them if they could not be written.

Start it after forking (``--workers``): a thread does not survive a fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from logging.handlers import QueueHandler, QueueListener
from typing import Any, TextIO, Union

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

#: Log lines waiting for the writer at most (~200 bytes each queued); beyond it they are
#: dropped: stderr is stuck, or a storm of thousands of clients outpaces the writer.
LOG_QUEUE_LINES = 50_000

#: A queued line: when it was logged (``record.created``) and its text without the timestamp.
#: A tuple, not the LogRecord: a record costs ~0.5 KiB while it waits.
Entry = tuple[float, str]
#: What the queue carries: lines, and flush requests (set once everything before is written).
_Queued = Union[Entry, threading.Event]


class _BoundedQueueHandler(QueueHandler):
    """Queues each record as an :data:`Entry`; never blocks, drops and counts past the bound.

    A SimpleQueue takes no lock of its own for thousands of threads to fight over; the bound
    is checked first, so racing threads may pass it by a few lines.
    """

    def __init__(self, entries: queue.SimpleQueue[_Queued], fmt: str) -> None:
        super().__init__(entries)
        self.entries = entries
        self.setFormatter(logging.Formatter(fmt.replace("%(asctime)s ", "")))
        self.dropped = 0
        self._dropped_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if self.entries.qsize() < LOG_QUEUE_LINES:
            super().emit(record)
        else:
            with self._dropped_lock:
                self.dropped += 1

    def prepare(self, record: logging.LogRecord) -> Entry:
        return record.created, self.format(record)

    def report_dropped(self) -> None:
        """Queue one WARNING (past the bound) saying how many lines were dropped, if any."""
        if self.dropped:
            record = logging.makeLogRecord({
                "name": "tcp_upper", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d líneas del registro se descartaron: se escribían más despacio de lo "
                       "que llegaban", "args": (self.dropped,)})
            self.entries.put_nowait(self.prepare(record))


class LogWriter(QueueListener):
    """The listener thread: adds the timestamp, writes what is queued in one write()."""

    def __init__(self, entries: queue.SimpleQueue[_Queued], stream: TextIO) -> None:
        super().__init__(entries)
        self.entries, self.stream = entries, stream
        self._lines: list[str] = []
        self._second, self._date = -1, ""  # the date and time of the last whole second seen
        #: When the stop began (time.monotonic()); set by serving.serve, None until then.
        self.stop_began: float | None = None
        #: Whether every line was written at the end of background_logging().
        self.written = False

    def handle(self, record: Any) -> None:
        if isinstance(record, threading.Event):
            self._write()
            record.set()
            return
        created, text = record
        if int(created) != self._second:  # in a storm, thousands of lines share one second
            self._second, self._date = int(created), time.strftime(
                logging.Formatter.default_time_format, logging.Formatter.converter(created))
        # logging.Formatter's default %(asctime)s: 2024-05-01 12:00:00,123
        self._lines.append(f"{self._date},{int(created % 1 * 1000):03d} {text}\n")
        if self.entries.empty():
            self._write()

    def _write(self) -> None:
        text, self._lines = "".join(self._lines), []
        with contextlib.suppress(OSError, ValueError):  # stderr broken or closed: drop
            self.stream.write(text)
            self.stream.flush()

    def flush(self, timeout: float) -> bool:
        """Wait up to *timeout* s until every line queued so far is written; False if stuck."""
        written = threading.Event()
        self.entries.put_nowait(written)
        return written.wait(max(0.0, timeout))


def exit_status(status: int, writer: LogWriter) -> int:
    """*status*, after background_logging() ended; when stderr is stuck, the process exits
    here with it (``os._exit``): a normal exit would block flushing stderr forever."""
    if not writer.written:
        os._exit(status)
    return status


def configure_logging(level: str) -> None:
    """One line per event on stderr, with a timestamp, written by the thread that logs."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)


@contextlib.contextmanager
def background_logging(level: str, *, exit_seconds: float,
                       with_pid: bool = False) -> Iterator[LogWriter]:
    """Route the root logger through a :class:`LogWriter` thread for the block's duration.

    When the block ends, the lines still queued are written, waiting at most until
    *exit_seconds* after ``writer.stop_began`` (or after now): a stderr nobody reads must not
    keep the process alive. With *with_pid*, lines show the process id. Yields the writer;
    ``writer.written`` false after the block means stderr is stuck (exit with ``os._exit``).
    """
    fmt = LOG_FORMAT.replace("%(levelname)s", "%(levelname)s [%(process)d]") if with_pid else (
        LOG_FORMAT)
    entries: queue.SimpleQueue[_Queued] = queue.SimpleQueue()
    handler = _BoundedQueueHandler(entries, fmt)
    logging.raiseExceptions = False  # a broken stderr must not print tracebacks to itself
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    writer = LogWriter(entries, sys.stderr)
    writer.start()
    try:
        yield writer
    finally:
        handler.report_dropped()
        began = time.monotonic() if writer.stop_began is None else writer.stop_began
        writer.written = writer.flush(began + exit_seconds - time.monotonic())
        writer.enqueue_sentinel()  # the thread ends once it is past the lines (if ever)
