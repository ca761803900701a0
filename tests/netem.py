"""A network emulator in user space: a point-to-point link that delays and drops packets.

``tc qdisc ... netem`` is the usual tool, but the CI kernel is built without it
(``CONFIG_NET_SCH_NETEM`` is off and there are no modules to load). This process does the same
job in user space, so the faults behave the same on every Linux that has TUN devices: it owns two
TUN devices, one for each end of the link, and copies every IP packet that one end sends into the
other end after *delay* seconds, dropping each packet on its own with probability *loss* (both
directions, like netem on both ends of a link). A loss of 1 is a silent partition: packets
vanish, nothing is refused or reset. As with netem, a full queue drops the packet.

``tests/netns.py`` runs it as ``python netem.py END_A END_B DELAY LOSS``. It prints ``ready``
once both devices exist, and exits when its standard input reaches end of file (the test process
closed it or ended, however it ended) or on SIGTERM/SIGINT. The kernel removes both devices, and
every route through them, when it exits.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), from <linux/if_tun.h>
IFF_TUN = 0x0001  # IP packets, no Ethernet header: no ARP to emulate
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix
#: Packets waiting in one direction, netem's default ``limit``.
QUEUE_LIMIT = 1000
#: Packets read from one device per wake-up, so one busy direction cannot starve the other.
BATCH = 64
MAX_PACKET = 65536

#: Packets waiting to enter one device, each with the time it is due.
Queue = collections.deque[tuple[float, bytes]]


def open_tun(name: str) -> int:
    """Create the TUN device *name* (gone again when the descriptor closes); non-blocking."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def take(fd: int, into: Queue, due: float, loss: float, rng: random.Random) -> None:
    """Read what *fd* has (up to a batch) and queue each packet that is not lost for *due*."""
    for _ in range(BATCH):
        try:
            packet = os.read(fd, MAX_PACKET)
        except BlockingIOError:
            return
        if rng.random() >= loss and len(into) < QUEUE_LIMIT:
            into.append((due, packet))


def deliver(fd: int, queue: Queue, now: float) -> None:
    """Write every packet whose time has come into *fd* (the delay is constant: FIFO)."""
    while queue and queue[0][0] <= now:
        with contextlib.suppress(OSError):  # the device went down: lost, as on a wire
            os.write(fd, queue.popleft()[1])


def relay(end_a: int, end_b: int, delay: float, loss: float, control: int) -> None:
    """Copy packets between the two ends until *control* reaches end of file."""
    rng = random.Random()
    towards: dict[int, Queue] = {end_a: collections.deque(), end_b: collections.deque()}
    peer = {end_a: end_b, end_b: end_a}
    while True:
        now = time.monotonic()
        waiting = [queue[0][0] for queue in towards.values() if queue]
        timeout = max(min(waiting) - now, 0.0) if waiting else None
        readable, _, _ = select.select([end_a, end_b, control], [], [], timeout)
        now = time.monotonic()
        if control in readable and not os.read(control, 4096):
            return
        for fd in (end_a, end_b):
            if fd in readable:
                take(fd, towards[peer[fd]], now + delay, loss, rng)
        for fd, queue in towards.items():
            deliver(fd, queue, now)


def main(argv: list[str]) -> int:
    """``netem.py END_A END_B DELAY_SECONDS LOSS``; 0 when told to stop, 2 on bad arguments."""
    if len(argv) != 4:
        print("usage: netem.py END_A END_B DELAY_SECONDS LOSS", file=sys.stderr)
        return 2
    name_a, name_b = argv[0], argv[1]
    delay, loss = float(argv[2]), float(argv[3])
    end_a, end_b = open_tun(name_a), open_tun(name_b)
    print("ready", flush=True)
    # Ctrl-C in a terminal reaches the whole process group: a normal stop, no traceback.
    with contextlib.suppress(KeyboardInterrupt):
        relay(end_a, end_b, delay, loss, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
