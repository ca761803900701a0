"""``python -m tcp_upper.cluster``: see :mod:`tcp_upper.cluster.cli`."""

import sys

from tcp_upper.cluster.cli import main

if __name__ == "__main__":
    sys.exit(main())
