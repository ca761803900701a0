"""The HAProxy configuration: ``haproxy.cfg.in`` (shipped in this package) filled from settings.

One source of truth for ``python -m tcp_upper.cluster`` and ``deploy/haproxy.cfg`` (its rendering
with the defaults, kept equal by a test). The template holds the text and its comments;
this module computes the values that depend on the settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from string import Template

from .. import config
from ..system import format_address

#: Where the local instances listen: only HAProxy needs to reach them.
BACKEND_HOST = "127.0.0.1"
DEFAULT_INSTANCES = 3
#: HAProxy's connection cap (process and front end). A proxied client costs HAProxy two
#: descriptors; 4096 clients fit a usual 20k hard limit and cover the 2000-client benchmark.
DEFAULT_MAXCONN = 4096
#: Proxy inactivity limit when the servers' idle timeout is off: people at a client may think
#: for minutes, so an hour; TCP keepalive on both sides notices dead peers well before.
NO_IDLE_TIMEOUT_SECONDS = 3600
#: Added to the servers' idle timeout, so the server (which logs why and closes in order)
#: acts before the proxy cuts the connection silently.
IDLE_TIMEOUT_MARGIN_SECONDS = 10
#: HAProxy rejects timeouts past 2**31 - 1 ms (about 24 days).
HAPROXY_MAX_TIMEOUT_SECONDS = 2_147_483

FRONTEND_NAME = "tcp_upper"
BACKEND_NAME = "tcp_upper_servers"


@dataclass(frozen=True)
class HealthCheck:
    """How HAProxy decides that a back end is up: every *inter_ms*, a line and its reply.

    A server is marked down after *fall* failed checks in a row and up again after *rise*
    good ones; a check unanswered for *timeout_ms* fails. The defaults notice a hung server
    within 3 s (fall x (inter + timeout)), a dead one within 1 s (fall x inter: its port
    refuses at once), for two short connections a second per server; docs/CLUSTER.md gives
    the reasons.
    """

    inter_ms: int = 500
    fall: int = 2
    rise: int = 2
    timeout_ms: int = 1000


#: The production defaults (a frozen instance: safe to share as a default argument).
DEFAULT_CHECK = HealthCheck()


def default_backends(
    base_port: int = 5001, count: int = DEFAULT_INSTANCES
) -> list[tuple[str, int]]:
    """The local back ends of the cluster command: *count* ports from *base_port* on loopback."""
    return [(BACKEND_HOST, base_port + i) for i in range(count)]


def parse_backend(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> ``(host, port)``; ValueError says what is wrong."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"--backend {text!r}: use HOST:PUERTO, p. ej. 10.0.0.2:5000")
    return host, int(port_text)


def _duration(seconds: float) -> str:
    """A HAProxy time value, in the largest whole unit: ``3600`` -> ``1h``, ``40`` -> ``40s``."""
    whole = math.ceil(seconds)
    if whole % 3600 == 0:
        return f"{whole // 3600}h"
    if whole % 60 == 0:
        return f"{whole // 60}m"
    return f"{whole}s"


def _interval(milliseconds: int) -> str:
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def proxy_idle_timeout(idle_timeout: float | None) -> float:
    """Seconds HAProxy lets a connection stay silent, given the servers' idle timeout."""
    if idle_timeout is None:
        return NO_IDLE_TIMEOUT_SECONDS
    return min(idle_timeout + IDLE_TIMEOUT_MARGIN_SECONDS, HAPROXY_MAX_TIMEOUT_SECONDS)


def _idle_comment(idle_timeout: float | None) -> str:
    if idle_timeout is None:
        return (
            "    # The servers' idle timeout is off (a person may think for minutes): cap silence\n"
            f"    # at {_duration(NO_IDLE_TIMEOUT_SECONDS)}; TCP keepalive notices dead peers "
            "long before."
        )
    return (
        f"    # The servers close clients silent for {idle_timeout:g} s and log why; the proxy\n"
        f"    # waits {IDLE_TIMEOUT_MARGIN_SECONDS} s longer so that the server acts first."
    )


def render_haproxy_config(
    front_host: str = config.Settings.host,
    front_port: int = config.Settings.port,
    backends: Sequence[tuple[str, int]] | None = None,
    *,
    idle_timeout: float | None = None,
    check: HealthCheck = DEFAULT_CHECK,
    maxconn: int = DEFAULT_MAXCONN,
    stats_socket: str | None = None,
    tls_cert: str | None = None,
    front_fd: int | None = None,
) -> str:
    """The HAProxy configuration for tcp_upper servers at *backends* behind *front_host:port*.

    Called with no arguments it returns ``deploy/haproxy.cfg``. *idle_timeout* is the servers'
    (``None`` = off) and sets the proxy's own inactivity timeouts; *stats_socket* adds the
    admin socket the cluster command and the tests read server states from; *tls_cert* (a PEM
    with certificate and key) makes the front speak TLS; *front_fd* binds the front to a
    listening socket HAProxy inherits (``fd@N``) instead of the address.
    """
    backends = default_backends() if backends is None else list(backends)
    if not backends:
        raise ValueError("at least one back end is needed")
    bind = format_address((front_host, front_port)) if front_fd is None else f"fd@{front_fd}"
    if tls_cert is not None:
        bind += f" ssl crt {tls_cert}"
    template = Template(resources.files("tcp_upper.cluster").joinpath("haproxy.cfg.in").read_text(
        encoding="utf-8"))
    return template.substitute(
        maxconn=maxconn,
        stats_socket="" if stats_socket is None else (
            f"\n    stats socket {stats_socket} mode 600 level admin"),
        idle_comment=_idle_comment(idle_timeout),
        idle=_duration(proxy_idle_timeout(idle_timeout)),
        check_timeout=_interval(check.timeout_ms),
        bind=bind,
        inter=_interval(check.inter_ms),
        fall=check.fall,
        rise=check.rise,
        detect=_interval(check.fall * (check.inter_ms + check.timeout_ms)),
        servers="\n".join(
            f"    server s{i} {format_address((host, port))} check"
            for i, (host, port) in enumerate(backends, start=1)
        ),
    )
