"""Upper-casing of UTF-8 bytes whose cost does not depend on the text; pure logic, no I/O.

:func:`upper` returns exactly
``data.decode("utf-8", "surrogateescape").upper().encode("utf-8", "surrogateescape")`` for any
bytes: Unicode upper case for UTF-8 text, every byte that is not UTF-8 unchanged. Python's codecs
and ``str.upper()`` make that 3-10 times slower than ``bytes.upper()`` on text with accents or
another script, and about 25 times slower on bytes that are not UTF-8 (every one becomes a
surrogate and back). The optional C extension :mod:`tcp_upper._speedups` does it in one pass
over the bytes; without a compiler at install time the pure-Python fallback is used.

:func:`incomplete_tail` says how many bytes at the end of a chunk are the start of a character
that the next chunk may complete.

``TCP_UPPER_PURE_PYTHON=1`` in the environment forces the fallback (tests and benchmarks use it
to compare both); :data:`ACCELERATED` says which one is in use, for this module and for
tcp_upper.protocol, which takes the extension's command search from here
(:data:`c_find_command_line`): one switch decides for both.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Callable

#: Code points from here on never change under ``str.upper()`` (tests/test_casing.py checks it
#: for the running Python). Computing the table only below it keeps the import fast.
TABLE_LIMIT = 0x20000

# Invalid UTF-8 bytes become lone surrogates on decode and the same bytes again on encode;
# str.upper() leaves surrogates alone, so non-UTF-8 input passes through byte for byte.
_ERRORS = "surrogateescape"

# Upper case of text whose code points are all below U+0100 (Spanish, most Western European
# text), as a table over its Latin-1 bytes: str.upper() takes a slow per-character path on such
# text, a translation and two codec calls cost a fraction. µ (U+00B5 upper-cases to U+039C),
# ß ("SS") and ÿ (U+0178) leave Latin-1, so text holding them takes the general path.
_LATIN1_UPPER = bytes.maketrans(bytes(range(256)), "".join(
    c if c in "\xb5\xdf\xff" else c.upper() for c in map(chr, range(256))).encode("latin-1"))
_LATIN1_LEAVING = (0xB5, 0xDF, 0xFF)  # `int in bytes` is a memchr (unlike a regex set)

# incomplete_tail: the second bytes a lead allows, where not 80-BF (CPython's strict rules: no
# overlongs, nothing above U+10FFFF). ED A0-BF (a surrogate, never valid) is missing on purpose:
# CPython's incremental decoder still buffers it when it is the last two bytes, so that the
# "surrogatepass" error handler can join a surrogate split across reads (unicodeobject.c,
# "Truncated surrogate code"), and this function says what that decoder keeps.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _sequence_length(lead: int) -> int:
    """Length of the UTF-8 sequence that *lead* starts; 0 if it cannot start one."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def incomplete_tail(data: bytes) -> int:
    """How many bytes (0 to 3) at the end of *data* start a character more bytes could complete.

    Exactly what CPython's incremental UTF-8 decoder keeps buffered after ``final=False``: a
    caller that upper-cases a stream chunk by chunk holds those bytes for the next chunk, so a
    character split by a read is upper-cased whole. Bytes that can no longer become valid are
    not counted: they pass through as invalid bytes.
    """
    # Only the last byte that is not a continuation byte (80-BF) can start the unfinished
    # sequence: everything after a lead must be continuation bytes.
    for back in range(1, min(3, len(data)) + 1):
        lead = data[-back]
        if not 0x80 <= lead <= 0xBF:
            break
    else:
        return 0  # empty, or only continuation bytes: nothing can still complete
    if _sequence_length(lead) <= back:
        return 0  # ASCII, a byte that starts nothing, or a sequence that is complete
    if back >= 2:
        low, high = _SECOND_BYTE.get(lead, (0x80, 0xBF))
        if not low <= data[-back + 1] <= high:
            return 0
    return back


def _pure_upper(data: bytes) -> bytes:
    """The fallback: Python's codec and ``str.upper()``, through the Latin-1 table if it can."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", _ERRORS).upper().encode("utf-8", _ERRORS)
    try:
        latin = text.encode("latin-1")
    except UnicodeEncodeError:
        return text.upper().encode("utf-8")
    if any(byte in latin for byte in _LATIN1_LEAVING):
        return text.upper().encode("utf-8")
    return latin.translate(_LATIN1_UPPER).decode("latin-1").encode("utf-8")


def upper_table() -> dict[int, bytes]:
    """Every code point below :data:`TABLE_LIMIT` that ``str.upper()`` changes, to the UTF-8 of
    its upper case (ASCII and surrogates left out: the C code handles ASCII itself).

    Computed from the running Python, so the C code agrees with its Unicode version (3.9 and
    3.13 differ). Blocks of 128 code points that do not change as a whole are skipped with one
    ``upper()`` each (per code point that would take 0.04-0.1 s at import).
    """
    table: dict[int, bytes] = {}
    for start in range(0x80, TABLE_LIMIT, 128):
        block = "".join(map(chr, range(start, start + 128)))
        if 0xD800 <= start < 0xE000 or block.upper() == block:
            continue
        for cp in range(start, start + 128):
            upper = chr(cp).upper()
            if upper != chr(cp):
                table[cp] = upper.encode("utf-8")
    return table


def _extension() -> ModuleType | None:
    """The C extension, or None (not built, or ``TCP_UPPER_PURE_PYTHON=1``)."""
    if os.environ.get("TCP_UPPER_PURE_PYTHON") == "1":
        return None
    try:
        from tcp_upper import _speedups
    except ImportError:
        return None
    return _speedups


_speedups = _extension()

#: The C upper-casing bound to this Python's table, or None.
_c_upper: Callable[[bytes], bytes] | None = (
    None if _speedups is None else _speedups.make_upper(upper_table()))

#: Whether :func:`upper` uses the C extension (False: the pure-Python fallback).
ACCELERATED = _speedups is not None

#: ``find_command_line(data, at_line_start)`` in C, under the same switch as :func:`upper`; None
#: when the extension is not in use (tcp_upper.protocol then searches with its regular
#: expression).
c_find_command_line: Callable[[bytes, bool], int] | None = (
    None if _speedups is None else _speedups.find_command_line)


def upper(data: bytes) -> bytes:
    """``data.decode("utf-8", "surrogateescape").upper().encode("utf-8", "surrogateescape")``,
    at a cost that depends on the length of *data* rather than on what it says.

    A trailing incomplete sequence is just invalid bytes here (see :func:`incomplete_tail`).
    """
    if _c_upper is not None:  # on ASCII too: 3-6 times faster than bytes.upper() per 64 KiB
        return _c_upper(data)
    if data.isascii():
        return data.upper()
    return _pure_upper(data)
