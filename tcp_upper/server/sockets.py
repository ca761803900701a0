"""What the server asks of the kernel for one client socket: options, queue sizes, closing.

Timeouts are kernel socket options (``SO_RCVTIMEO``/``SO_SNDTIMEO``) on a blocking socket, so
every read and write is a single system call; an expired timeout surfaces as
``BlockingIOError``. Linux option names are used where they exist; other systems keep their
defaults.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time

#: Bytes asked of each recv(): large enough for bulk transfers in few calls; replies go out per
#: chunk, so memory per connection is bounded by it whatever the line length.
READ_SIZE = 64 * 1024

#: Keepalive: probe a silent peer after a minute, give up after 5 unanswered probes 10 s apart.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 10, 5


def set_timeout(sock: socket.socket, option: int, seconds: float | None) -> None:
    """Set ``SO_RCVTIMEO`` or ``SO_SNDTIMEO`` (a C ``struct timeval``); ``None`` blocks forever."""
    if seconds is None:
        sec, usec = 0, 0
    else:  # at least 1 us: a zero timeval would mean "forever"
        sec, usec = int(seconds), max(1, int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", sec, usec))


def enable_keepalive(sock: socket.socket) -> None:
    """TCP keepalive with the probes above, so a vanished peer is noticed in minutes, not hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def all_sent(sock: socket.socket) -> bool:
    """True when the client has acknowledged every reply byte (``TIOCOUTQ`` is 0).

    False where the system cannot tell or the socket is closed: the caller then assumes
    replies are still on their way, the safe answer.
    """
    try:
        import fcntl
        import termios

        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (ImportError, AttributeError, OSError, ValueError):
        return False
    return int(struct.unpack("@i", raw)[0]) == 0


def refuse(request: socket.socket, message: str) -> None:
    """Send a refused client its ERROR line without blocking (the caller then closes it)."""
    with contextlib.suppress(OSError):  # it left already
        request.send(message.encode(), socket.MSG_DONTWAIT)


def close_orderly(sock: socket.socket, drain_seconds: float) -> None:
    """Half-close, then discard what the client still sends for at most *drain_seconds*.

    Closing with unread bytes in the receive queue makes the kernel send a reset, which can
    destroy replies the client has not read yet; reading until its end of stream avoids it.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the client reset meanwhile (ENOTCONN): nothing left to drain
        return
    deadline = time.monotonic() + drain_seconds
    while (left := deadline - time.monotonic()) > 0:
        set_timeout(sock, socket.SO_RCVTIMEO, left)
        try:
            if not sock.recv(READ_SIZE):
                return
        except OSError:  # timed out, or reset: nothing more to wait for
            return
