"""Types of the optional C extension built from _speedups.c (see tcp_upper/casing.py)."""

from typing import Callable

def make_upper(mapping: dict[int, bytes]) -> Callable[[bytes], bytes]: ...
