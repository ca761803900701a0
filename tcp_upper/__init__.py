"""tcp_upper: a TCP service that answers every message in upper case.

The package is layered so that each module has one job:

- ``protocol``: the wire rules as pure logic (bytes in, bytes out); no sockets.
- ``server``: a threaded ``socketserver`` that moves bytes between sockets and the protocol.
- ``client``: ``UpperClient`` and the interactive program.
- ``config``: one settings object for both programs (flag > environment > env file > default).
"""

__version__ = "1.0.0"
