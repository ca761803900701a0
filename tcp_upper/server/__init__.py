"""The threaded server: one thread per client, moving bytes between its socket and the protocol.

Configured the ``socketserver`` way, with class attributes and hooks. The package's modules,
each with one job:

- ``threaded``: :class:`UpperServer` (a ``ThreadingTCPServer``) admits clients up to
  ``max_clients`` and keeps the set of open connections; :func:`make_server` binds one;
- ``handler``: :class:`UpperHandler` (a ``StreamRequestHandler``) runs the read → feed → send
  loop for one client;
- ``stop``: the ordered stop within 2 s, its time budget and every step;
- ``sockets``: socket options, kernel queue sizes and the orderly close.

Nothing here reads settings files, configures logging or installs signal handlers but the
stop's wake-up: :mod:`tcp_upper.serving` wires those together.
"""

from ..protocol import HOLD_BACK_SECONDS
from .handler import Reason, UpperHandler
from .sockets import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL
from .stop import install_wake_handler
from .threaded import UpperServer, UpperServer6, bind_error_message, make_server

__all__ = [
    "HOLD_BACK_SECONDS",
    "KEEPALIVE_COUNT",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "Reason",
    "UpperHandler",
    "UpperServer",
    "UpperServer6",
    "bind_error_message",
    "install_wake_handler",
    "make_server",
]
