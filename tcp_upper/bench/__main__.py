"""``python -m tcp_upper.bench``: the same as the ``tcp-upper-bench`` command."""

import sys

from .cli import main

sys.exit(main())
