"""The package's exceptions: one root, so callers can catch everything tcp_upper raises.

::

    TcpUpperError
     ├── SettingsError          a setting has a bad value, or --env-file is missing (exit 2)
     ├── ServerStartError       make_server cannot listen, e.g. the port is in use (exit 1)
     └── UpperClientError       the client cannot reach, or lost, the server (exit 1);
                                also a ConnectionError, so ``except ConnectionError`` works

Every message is one line meant for a person: it says what happened and what to check.
"""

from __future__ import annotations


class TcpUpperError(Exception):
    """Root of every exception tcp_upper raises on purpose."""


class SettingsError(TcpUpperError, ValueError):
    """A setting is invalid; the message names the setting, the value and where it came from."""


class ServerStartError(TcpUpperError, OSError):
    """The server could not start listening; the message names the address and what to do."""


class UpperClientError(TcpUpperError, ConnectionError):
    """The client failed to talk to the server; the message names host and port."""
