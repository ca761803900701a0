"""``python -m tcp_upper.server``: the process wiring lives in :mod:`tcp_upper.cli`.

A package ``__main__`` keeps the library module free of any import of the wiring.
"""

import sys

from tcp_upper.cli import server_main

if __name__ == "__main__":
    sys.exit(server_main())
