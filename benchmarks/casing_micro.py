"""Time per 64 KiB of upper-casing, C accelerator against the pure-Python fallback, in one run.

usage: python benchmarks/casing_micro.py [--repeat N] [--other PATH]

Rows are payloads: ASCII, Spanish prose with accents, random bytes (mostly invalid UTF-8),
Cyrillic and Greek text, lines of accented letters only. Columns: ``bytes.upper()`` (ASCII only,
the floor), the definition ``decode("utf-8", "surrogateescape").upper().encode(...)``, the
pure-Python fallback of tcp_upper.casing (the definition plus its Latin-1 table) and
``casing.upper`` with the C extension. ``--other PATH`` adds a column for another build of the
extension (a ``_speedups*.so`` built from an earlier _speedups.c, say), to compare two versions
of the C code in one run. Figures are the minimum over repeats (timeit); compare within one
run only.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import timeit
from pathlib import Path
from typing import Callable

# Runnable from a clone without installing: the checkout's tcp_upper first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcp_upper import casing

SIZE = 64 * 1024

SPANISH = ("El pingüino Wenceslao hizo kilómetros bajo exhaustiva lluvia y frío; añoraba a su "
           "querido cachorro. ¿Qué más daba? La señora Núñez pidió un café con azúcar, "
           "jamón ibérico y una tortilla de patatas en el andén de Córdoba.\n")
CYRILLIC_GREEK = ("Съешь же ещё этих мягких французских булок, да выпей чаю. "
                  "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Γαζίες καὶ μυρτιὲς δὲν θὰ βρῶ πιά.\n")


def repeat_to_size(unit: bytes) -> bytes:
    """*unit* repeated to SIZE bytes, cut at a character boundary (no split sequence)."""
    data = unit * (SIZE // len(unit) + 1)
    cut = SIZE
    while cut and 0x80 <= data[cut] <= 0xBF:  # do not cut inside a character
        cut -= 1
    return data[:cut]


PAYLOADS = {
    "ascii": repeat_to_size(b"The quick brown fox jumps over the lazy dog, 0123456789.\n"),
    "spanish": repeat_to_size(SPANISH.encode()),
    "random bytes": random.Random(8).randbytes(SIZE),
    "cyrillic+greek": repeat_to_size(CYRILLIC_GREEK.encode()),
    "accented": repeat_to_size("ñáéíóúüçàè".encode() * 3 + b"\n"),  # the load's non-ascii class
}


def definition(data: bytes) -> bytes:
    return data.decode("utf-8", "surrogateescape").upper().encode("utf-8", "surrogateescape")


def per_64k(function: Callable[[bytes], bytes], data: bytes, repeat: int) -> float:
    """Microseconds per 64 KiB: the best of *repeat* timings of enough calls for ~20 ms each."""
    number = max(1, int(0.02 / max(timeit.timeit(lambda: function(data), number=1), 1e-7)))
    best = min(timeit.repeat(lambda: function(data), number=number, repeat=repeat)) / number
    return best * 1e6 * SIZE / len(data)


def other_build(path: str) -> Callable[[bytes], bytes]:
    """upper() from the extension built at *path*, bound to this Python's table."""
    spec = importlib.util.spec_from_file_location("_speedups", path)  # its PyInit__speedups
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    upper: Callable[[bytes], bytes] = module.make_upper(casing.upper_table())
    return upper


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--other", metavar="PATH", help="another build of tcp_upper._speedups")
    args = parser.parse_args(argv)
    accelerated = casing._c_upper
    columns: dict[str, Callable[[bytes], bytes] | None] = {
        "bytes.upper": bytes.upper,
        "definition": definition,
        # As casing.upper runs them: without the extension bytes.upper() for ASCII, else the
        # pure path; with it, the C function on everything (ASCII included).
        "pure": lambda data: data.upper() if data.isascii() else casing._pure_upper(data),
        "C": accelerated,
    }
    if args.other:
        columns["other C"] = other_build(args.other)
    print(f"Python {sys.version.split()[0]}; microseconds per 64 KiB, min of {args.repeat}; "
          f"C extension: {'yes' if accelerated else 'no (not built, or TCP_UPPER_PURE_PYTHON=1)'}")
    print(f"{'payload':<16}" + "".join(f"{name:>13}" for name in columns) + f"{'pure/C':>9}")
    for name, data in PAYLOADS.items():
        row: dict[str, float | None] = {}
        for column, function in columns.items():
            if function is None or (column == "bytes.upper" and not data.isascii()):
                row[column] = None  # bytes.upper() is not an answer for non-ASCII text
                continue
            if function(data) != definition(data):
                raise SystemExit(f"{column} gives a wrong answer for {name}")
            row[column] = per_64k(function, data, args.repeat)
        cells = "".join(f"{'-' if value is None else f'{value:.0f}':>13}" for value in row.values())
        pure, c = row["pure"], row["C"]
        ratio = f"{pure / c:.1f}x" if pure is not None and c else "-"
        print(f"{name:<16}{cells}{ratio:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
