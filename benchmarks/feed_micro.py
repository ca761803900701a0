"""Time per 64 KiB of UpperProtocol.feed, the C command search against the regular expression.

usage: python benchmarks/feed_micro.py [--repeat N]

Rows are the load's payload classes (tcp_upper/bench/payloads.py, one 64 KiB batch: 16 units of
4 KiB, as one server read), then lines meant to make a search slow: the word after other text,
the word split by a blank, the word after 40 blanks, all X. Columns: feed with the search
tcp_upper.protocol uses when the C extension is built (``_speedups.find_command_line``), feed
with the pure-Python search (X pre-check, gate, regular expression), and each search alone.
Upper-casing is casing.upper in every column (the C one when built). Minimum over repeats;
compare within one run only.
"""

from __future__ import annotations

import argparse
import functools
import sys
import timeit
from pathlib import Path
from typing import Callable

# Runnable from a clone without installing: the checkout's tcp_upper first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcp_upper import protocol
from tcp_upper.bench.payloads import PAYLOADS, LineMaker, build_batch, cycle_lines

SIZE = 64 * 1024
ROWS: dict[str, LineMaker] = {
    **PAYLOADS,
    "x-word": cycle_lines([b"x desconexion\n"]),
    "split-word": cycle_lines([b"desco nexion\n"]),
    "40-blanks": cycle_lines([b" " * 40 + b"desconexion\n"]),
    "all-x": cycle_lines([b"x" * 63 + b"\n"]),
}


def per_64k(function: Callable[[], object], size: int, repeat: int) -> float:
    """Microseconds per 64 KiB: the best of *repeat* timings of enough calls for ~20 ms each."""
    number = max(1, int(0.02 / max(timeit.timeit(function, number=1), 1e-7)))
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6 * SIZE / size


def feed_with(search: Callable[[bytes, bool], int], data: bytes) -> Callable[[], object]:
    """One feed of *data* to a new protocol, with *search* as its command search."""
    def run() -> object:
        protocol._find_command_line = search
        return protocol.UpperProtocol().feed(data)
    return run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        from tcp_upper._speedups import find_command_line
    except ImportError:
        raise SystemExit("tcp_upper._speedups is not built: nothing to compare") from None
    pure = protocol._search_command_line
    used = protocol._find_command_line
    print(f"Python {sys.version.split()[0]}; microseconds per 64 KiB, min of {args.repeat}")
    columns = ("feed C", "feed regex", "C search", "regex search")
    print(f"{'payload':<14}" + "".join(f"{name:>14}" for name in columns) + f"{'regex/C':>9}")
    try:
        for name, maker in ROWS.items():
            data = build_batch(maker, 0, 16, 4096).data
            if (find_command_line(data, True), pure(data, True)) != (-1, -1):
                raise SystemExit(f"{name}: a search finds a command in a load payload")
            row = [per_64k(function, len(data), args.repeat) for function in (
                feed_with(find_command_line, data), feed_with(pure, data),
                functools.partial(find_command_line, data, True),
                functools.partial(pure, data, True))]
            print(f"{name:<14}" + "".join(f"{value:>14.1f}" for value in row)
                  + f"{row[1] / row[0]:>8.1f}x")
    finally:
        protocol._find_command_line = used
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
