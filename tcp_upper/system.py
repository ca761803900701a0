"""What the programs ask of the operating system besides the sockets themselves.

One place for: how an address is written for people (and HAProxy), which address a listening
socket takes for a host name, and raising the open-file limit. No socket is opened here.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any


def format_address(address: tuple[Any, ...]) -> str:
    """``host:port`` for IPv4 and names, ``[host]:port`` for IPv6, as people and URLs write
    them; *address* is a socket address tuple (extra IPv6 fields are ignored)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The family and socket address to bind for *host*: the first it resolves to
    (``localhost`` gives 127.0.0.1 on a usual machine, ``::`` the IPv6 wildcard).

    Raises ``socket.gaierror`` when the name does not resolve.
    """
    family, _, _, _, address = socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0]
    return family, address


def raise_open_file_limit(wanted: int) -> int | None:
    """Raise the soft open-file limit toward the hard one, up to *wanted* descriptors.

    A default soft limit of 1024 would cap a process near 1000 connections. Returns the soft
    limit now in force, or None where it is unlimited or the system has no such limit.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):  # the caller checks what it got
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft
