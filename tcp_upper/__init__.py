"""tcp_upper: a TCP service that answers every message in upper case.

The package is layered; a module imports only from its own layer or the ones above it::

    library        errors, system, plural, config         exceptions, OS plumbing, settings
                   protocol, proxy_protocol               wire rules and PROXY headers: pure logic
                   casing (+ optional C _speedups)        upper case of UTF-8 bytes: pure logic
                   server/   client/                      sockets and threads around protocol
    wiring         logs → serving → workers → cli         log thread, signals, processes, argv
    tools          bench, cluster                         measure, run behind HAProxy

``server`` and ``client`` are packages whose ``__main__`` calls ``cli``: that way
``python -m tcp_upper.server`` works while the library never imports the wiring.
"""

__version__ = "1.0.0"
