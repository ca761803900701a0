"""Stopping the server in order within 2 s of SIGTERM, SIGINT or SIGHUP: the budget and its steps.

The whole promise can be checked here. Times are seconds after the stop signal; each step
names the function that does it::

    0.0  the main thread takes the signal                        tcp_upper.serving.serve
         1. stop accepting, within ACCEPT_POLL_SECONDS (0.1)     stop_server
         2. end every connection in order                        UpperServer.close_clients
            a. quiet (blocked in recv, silent IDLE_QUIET_SECONDS, every reply acknowledged):
               half-closed from the stopping thread, its own thread is not woken
            b. every other: woken with WAKE_SIGNAL; its thread answers what the client still
               sends until it is silent ANSWER_QUIET_SECONDS (ANSWER_SECONDS at most), then
               half-closes and drains DRAIN_SECONDS                finish_serving
               -> a client is done within ANSWER_SECONDS + DRAIN_SECONDS = 0.8 s, unless it
                  reads its replies too slowly for that: then step 3 gives up on it
    1.4  3. CLIENTS_DONE: connections still being served are left to the process exit; each
            gets its disconnect line saying so
    1.8  4. LOG_DONE: the last log lines are written (a stuck stderr is given up on); with
            --workers, the parent kills a worker still alive
    2.0  5. the interpreter exits: EXIT_SECONDS (0.2) are kept for it

Why a signal rather than ``shutdown(SHUT_RD)`` for 2b, and the decisions behind the figures,
are in docs/OPERATIONS.md ("Stop").
"""

from __future__ import annotations

import contextlib
import logging
import select
import signal
import socket
import time
from typing import TYPE_CHECKING

from ..plural import plural
from ..protocol import UpperProtocol
from .sockets import READ_SIZE, all_sent, close_orderly, set_timeout

if TYPE_CHECKING:
    from .handler import UpperHandler
    from .threaded import UpperServer

log = logging.getLogger("tcp_upper.server")

#: The promise: the process has exited this long after the stop signal.
STOP_DEADLINE = 2.0
#: Kept for the interpreter to exit once the last log line is out.
EXIT_SECONDS = 0.2
#: Kept for writing the log lines still queued when the clients are done.
LOG_FLUSH_SECONDS = 0.4
#: Step 4: by then every log line is written, and every worker process has ended.
LOG_DONE = STOP_DEADLINE - EXIT_SECONDS
#: Step 3: by then every client connection has ended in order, or is given up on.
CLIENTS_DONE = LOG_DONE - LOG_FLUSH_SECONDS

#: Step 1: how often the accept loop checks whether it must stop (serve_forever's poll).
ACCEPT_POLL_SECONDS = 0.1
#: Step 2a: a client that sent nothing for this long is taken as quiet (a client still talking
#: may have replies in flight, which a reset at exit would destroy).
IDLE_QUIET_SECONDS = 0.25
#: Step 2b: answer until the client is silent this long (its kernel sends what it held back as
#: soon as the server reads), for ANSWER_SECONDS at most; a final send gets as long.
ANSWER_QUIET_SECONDS, ANSWER_SECONDS = 0.02, 0.5
#: Step 2b: the drain after the half-close; short, so thousands of threads are done early.
DRAIN_SECONDS = 0.3

#: Interrupts a client thread's blocked recv()/send() (step 2b). The system call is retried
#: after the signal, so the socket first gets timeouts that make the retry return at once.
WAKE_SIGNAL = signal.SIGUSR1
_WAKE_RECV_SECONDS = 0.001


def install_wake_handler() -> None:
    """Install the no-op handler that lets :data:`WAKE_SIGNAL` interrupt system calls.

    Call once from the main thread before :meth:`UpperServer.close_clients`: with the default
    disposition the signal would end the process, and an ignored one interrupts nothing.
    """
    signal.signal(WAKE_SIGNAL, lambda signum, frame: None)


def stop_server(server: UpperServer, began: float) -> None:
    """Steps 1 to 3 for *server*, from the main thread; *began* is the signal's monotonic time."""
    server.shutdown()
    unfinished = server.close_clients(began + CLIENTS_DONE - time.monotonic())
    if unfinished:
        log.warning("%s", plural(unfinished, "cliente no terminó a tiempo; se cierra",
                                 "clientes no terminaron a tiempo; se cierran"))
    server.server_close()
    log.info("Servidor parado")


def is_quiet(handler: UpperHandler, since: float) -> bool:
    """Step 2a's test: blocked in recv() owing nothing, silent since *since*, all acknowledged.

    The handler's fields are written by its own thread without a lock; a recv() that returns
    data between this test and the half-close can only be answered if the client reads it
    before FIN (docs/OPERATIONS.md, "Stop").
    """
    return handler.waiting_idle and handler.last_read < since and all_sent(handler.connection)


def end_quiet(request: socket.socket) -> None:
    """Step 2a: give a quiet client its end of stream; its thread wakes only if it closes."""
    with contextlib.suppress(OSError):  # the client left meanwhile
        request.shutdown(socket.SHUT_WR)


def set_stop_timeouts(request: socket.socket) -> None:
    """Step 2b, before waking: a retried recv() returns at once, a final send() is bounded."""
    with contextlib.suppress(OSError):  # already closed by its handler
        set_timeout(request, socket.SO_RCVTIMEO, _WAKE_RECV_SECONDS)
        set_timeout(request, socket.SO_SNDTIMEO, ANSWER_SECONDS)


def wake(request: socket.socket, thread: int | None) -> None:
    """Step 2b: interrupt the thread serving *request* (None: not started, sees the timeouts)."""
    set_stop_timeouts(request)
    if thread is not None:
        signal.pthread_kill(thread, WAKE_SIGNAL)


def finish_serving(sock: socket.socket, protocol: UpperProtocol) -> bool:
    """Step 2b, in the client's thread: answer, half-close, drain. True if DESCONEXION came.

    What the client sent before the stop is owed a reply, including bytes still on their way:
    its kernel holds back what did not fit in our receive queue and sends it as soon as we
    read. Hence answering until it has been silent a moment, rather than only what is queued.
    """
    deadline = time.monotonic() + ANSWER_SECONDS
    readable = select.poll()
    readable.register(sock, select.POLLIN)
    while time.monotonic() < deadline and readable.poll(ANSWER_QUIET_SECONDS * 1000):
        try:
            data = sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        if not data:
            break
        reply, close = protocol.feed(data)
        if reply:
            sock.sendall(reply)
        if close:
            close_orderly(sock, DRAIN_SECONDS)
            return True
    reply, _ = protocol.feed_eof()
    if reply:
        sock.sendall(reply)
    close_orderly(sock, DRAIN_SECONDS)
    return False
