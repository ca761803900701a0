"""tcp_upper.casing: the C accelerator and the pure-Python fallback both give exactly what
Python's codec and ``str.upper()`` give, for any bytes; incomplete_tail agrees with CPython's
incremental decoder. No sockets."""

from __future__ import annotations

import codecs
import functools
import importlib.util
import itertools
import os
import random
import shutil
import threading
from types import ModuleType
from typing import Callable

import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcp_upper import casing

try:
    from tcp_upper import _speedups
except ImportError:  # no compiler at install time: the C tests skip, the fallback ones run
    _speedups = None  # type: ignore[assignment]


def expected(data: bytes) -> bytes:
    """The definition of upper-casing bytes that casing.upper must match exactly."""
    return data.decode("utf-8", "surrogateescape").upper().encode("utf-8", "surrogateescape")


def c_upper() -> Callable[[bytes], bytes]:
    """The C function bound to this Python's table (whatever TCP_UPPER_PURE_PYTHON says)."""
    if _speedups is None:
        pytest.skip("tcp_upper._speedups is not built (no C compiler at install time)")
    return bound_upper(_speedups)


@functools.cache
def bound_upper(build: ModuleType) -> Callable[[bytes], bytes]:
    """*build*'s make_upper() bound to this Python's table, once per build of the extension."""
    upper: Callable[[bytes], bytes] = build.make_upper(casing.upper_table())
    return upper


@pytest.fixture(params=["built", "portable"])
def c_build(request: pytest.FixtureRequest) -> Callable[[bytes], bytes]:
    """The C function as installed, and as built without SSE2 (the loops of other CPUs)."""
    if request.param == "built":
        return c_upper()
    return bound_upper(request.getfixturevalue("portable_speedups"))


# Every way to upper-case that must agree with expected(): the public function, the C one, the
# pure-Python fallback.
IMPLEMENTATIONS = ["upper", "c", "pure"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> Callable[[bytes], bytes]:
    if request.param == "c":
        return c_upper()
    if request.param == "pure":
        return casing._pure_upper
    return casing.upper


# --- the table ---------------------------------------------------------------------------------

def test_no_code_point_above_the_table_changes() -> None:
    """The table stops at TABLE_LIMIT: a Unicode version that gives a code point above it an
    upper case must fail here, not silently leave it lower case in C."""
    step = 4096
    changed = []
    for start in range(casing.TABLE_LIMIT, 0x110000, step):
        block = "".join(map(chr, range(start, min(start + step, 0x110000))))
        if block.upper() != block:
            changed += [hex(ord(c)) for c in block if c.upper() != c]
    assert changed == []


def test_table_is_every_code_point_that_changes() -> None:
    """upper_table() skips whole blocks that do not change; it must miss no code point."""
    naive = {cp: chr(cp).upper().encode() for cp in range(0x80, casing.TABLE_LIMIT)
             if not 0xD800 <= cp < 0xE000 and chr(cp).upper() != chr(cp)}
    assert casing.upper_table() == naive
    assert casing.upper_table()[0xDF] == b"SS"


# --- properties --------------------------------------------------------------------------------

#: Lower-case letters of every script, and the ones whose upper case is longer than they are
#: (ß -> SS, ŉ -> U+02BC N, ﬁ -> FI, ΐ and ᾷ -> three code points, ǰ, ﬓ) or leaves Latin-1
#: (µ, ÿ).
SPECIALS = "ßŉﬁΐǰﬓᾷµÿ"
LETTERS = st.one_of(st.characters(whitelist_categories=("Ll", "Lt", "Lo", "Mn")),
                    st.sampled_from(SPECIALS), st.characters())
TEXT = st.text(LETTERS, max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass"))
ASCII = st.text(st.characters(max_codepoint=0x7F), max_size=8).map(str.encode)
#: Sequences CPython's strict decoder refuses: surrogates, overlongs, above U+10FFFF, bytes that
#: start nothing, lone continuation bytes.
INVALID = st.sampled_from([b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\x80", b"\xc1\xbf",
                           b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xf0\x80\x80\x80",
                           b"\xf0\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5", b"\xf8", b"\xff",
                           b"\x80", b"\xbf", b"\xc2", b"\xe0\xa0", b"\xf0\x90\x80"])
#: A valid non-ASCII character cut short (the rest never comes).
TRUNCATED = (st.characters(min_codepoint=0x80).map(lambda c: c.encode("utf-8", "surrogatepass"))
             .flatmap(lambda b: st.integers(1, len(b) - 1).map(lambda k: b[:k])))
PIECES = st.lists(st.one_of(TEXT, ASCII, INVALID, TRUNCATED, st.binary(max_size=12)),
                  max_size=24).map(b"".join)

PROPERTY_SETTINGS = settings(deadline=None, max_examples=examples(250),
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY_SETTINGS
@given(data=PIECES)
def test_upper_is_decode_upper_encode(implementation: Callable[[bytes], bytes],
                                      data: bytes) -> None:
    assert implementation(data) == expected(data)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=64))
def test_upper_of_random_bytes(implementation: Callable[[bytes], bytes], data: bytes) -> None:
    assert implementation(data) == expected(data)


# --- exhaustive --------------------------------------------------------------------------------

ALL_CODE_POINTS = [chr(cp) for cp in range(0x80, 0x110000) if not 0xD800 <= cp < 0xE000]


@functools.cache
def all_code_points_encoded() -> list[bytes]:
    return [c.encode() for c in ALL_CODE_POINTS]


@pytest.mark.parametrize("separator", [b"", b"a", b"\xff", b"\x80", b"\xc3", b"\xe1\x80",
                                       b"\xf4\x8f\x80"],
                         ids=["joined", "ascii", "ff", "continuation", "cut-2", "cut-3", "cut-4"])
def test_every_code_point_in_c(separator: bytes) -> None:
    """Every non-ASCII code point, next to each other and between invalid or cut-short bytes."""
    upper = c_upper()
    data = separator.join(all_code_points_encoded()) + separator
    assert upper(data) == expected(data)


def test_every_code_point_alone_in_c() -> None:
    """Each code point of the table's range alone (a sequence at the very end of the input)."""
    upper = c_upper()
    wrong = [hex(ord(c)) for c in ALL_CODE_POINTS[:casing.TABLE_LIMIT]
             if upper(c.encode()) != c.upper().encode()]
    assert wrong == []


#: Bytes that matter to a UTF-8 decoder: ASCII, the edges of the continuation ranges each lead
#: allows, every kind of lead, and bytes that start nothing.
INTERESTING = bytes([0x00, 0x61, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2,
                     0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5,
                     0xFF])


def short_strings(max_length: int) -> list[bytes]:
    return [bytes(combination) for length in range(max_length + 1)
            for combination in itertools.product(INTERESTING, repeat=length)]


def test_short_strings_in_c_and_pure() -> None:
    """Every string of up to 3 interesting bytes, alone; of 4, joined between ASCII letters."""
    upper = c_upper() if _speedups is not None else casing._pure_upper
    for data in short_strings(3):
        assert upper(data) == casing._pure_upper(data) == expected(data), data
    joined = b"z".join(bytes(c) for c in itertools.product(INTERESTING, repeat=4))
    assert upper(joined) == expected(joined)


def test_incomplete_tail_is_what_the_incremental_decoder_keeps() -> None:
    """Every string of up to 3 interesting bytes, alone and after a byte that may be the lead of
    a 4-byte sequence they complete."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    wrong = []
    for data in [first + rest for first in (b"", b"a", b"\x80", b"\xc2", b"\xe0", b"\xed",
                                            b"\xf0", b"\xf1", b"\xf4", b"\xff")
                 for rest in short_strings(3)]:
        decoder.reset()
        decoder.decode(data, False)
        if casing.incomplete_tail(data) != len(decoder.getstate()[0]):
            wrong.append(data)
    assert wrong == []


@pytest.mark.parametrize(("data", "tail"), [
    (b"", 0), (b"abc", 0), (b"\xc3", 1), (b"a\xc3", 1), (b"\xc3\xa9", 0), (b"\xe2\x82", 2),
    (b"\xe0\x9f", 0), (b"\xed\x9f", 2), (b"\xed\xa0", 2), (b"\xed\xa0\x80", 0),
    (b"\xf0\x9f\x98", 3), (b"\xf0\x8f", 0),
    (b"\xf4\x90", 0), (b"\xf5", 0), (b"\x80\x80\x80", 0), (b"\xf0\x9f\x98\x80", 0),
])
def test_incomplete_tail_examples(data: bytes, tail: int) -> None:
    assert casing.incomplete_tail(data) == tail


# --- the C extension itself --------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the fallback is expected")
def test_extension_is_built_here() -> None:
    """With a compiler, the install must have built the extension (it is optional, so a build
    failure only shows as a warning in pip's output: this makes CI notice)."""
    assert importlib.util.find_spec("tcp_upper._speedups") is not None
    assert casing.ACCELERATED is (os.environ.get("TCP_UPPER_PURE_PYTHON") != "1")


def test_pure_python_forced_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCP_UPPER_PURE_PYTHON", "1")
    assert casing._extension() is None


@pytest.mark.parametrize("data", [
    "ΐ".encode() * 5000,  # the largest growth: 2 bytes to 3 code points (6 bytes), throughout
    "ΐ".encode(), b"x" + "ΐ".encode(), "ΐ".encode() + b"\xff",
    b"a" * 10000 + "ΐ".encode() * 3 + b"a" * 3,  # the output grows near the end only
    "\N{LATIN SMALL LETTER DOTLESS I}".encode() * 5000 + "ΐ".encode() * 5000,  # shrinks, grows
    "ß".encode() * 9000,  # 2 bytes to "SS": as long as the input
])
def test_output_longer_or_shorter_than_the_input(data: bytes) -> None:
    """The output starts as long as the input and grows once where a mapping needs it."""
    assert c_upper()(data) == expected(data)


# Input that starts with many bytes that are not UTF-8 takes the C loop for random bytes (two
# passes over blocks of 512 bytes); these put every kind of sequence there, across block ends.
NOT_UTF8_START = bytes(range(0xF5, 0x100)) * 4  # 44 lead-like bytes, none followed by 80-BF


@PROPERTY_SETTINGS
@given(pieces=st.lists(st.one_of(TEXT, INVALID, TRUNCATED, st.binary(min_size=1, max_size=700)),
                       max_size=12),
       shift=st.integers(0, 7))
def test_upper_of_mostly_invalid_input(c_build: Callable[[bytes], bytes], pieces: list[bytes],
                                      shift: int) -> None:
    data = NOT_UTF8_START + b"\xff" * shift + b"".join(pieces)
    assert c_build(data) == expected(data)


@pytest.mark.parametrize("sequence",
                         ["é", "ß", "ΐ", "ﬀ", "\u0131", "\uff41", "\U00010428", "ŉ", "µ"])
@pytest.mark.parametrize("at", [505, 506, 509, 510, 511, 512, 1020, 1023])
def test_sequences_across_a_block_end_in_random_bytes(c_build: Callable[[bytes], bytes],
                                                     sequence: str, at: int) -> None:
    """Every offset near the end of the first block (512 bytes from the start), a sequence that
    maps to as many bytes, to more, to fewer, and one of four bytes."""
    noise = bytes(random.Random(at).choice(b"\x80\xc0\xf8\xffabz") for _ in range(2000))
    data = NOT_UTF8_START + noise[:at - len(NOT_UTF8_START)] + sequence.encode() * 3 + noise
    assert c_build(data) == expected(data)


@pytest.mark.parametrize("character", ["ñ", "ß", "\u01c5", "ΐ", "€", "\u0131"])
def test_two_byte_runs_broken_at_every_offset(character: str) -> None:
    """Dense text takes two bytes at a time (ASCII pairs and two-byte characters) in runs of up
    to 64 bytes: an odd byte (ASCII, a longer character, half a character, the end of the
    input) at every offset of two runs and a bit must be taken alone and the pairs realigned
    after it."""
    upper = c_upper()
    run = ("ñé" * 40).encode()
    for at in range(0, 140):
        for odd in (b"x", character.encode(), b"\xc3", b"\xbf"):
            data = run[:at] + odd + run[at:]
            assert upper(data) == expected(data), (at, odd)
            assert upper(data[:at + 1]) == expected(data[:at + 1]), (at, odd)
    mixed = ("ab " + character + "cd").encode() * 30
    for at in range(len(mixed) // 2):
        assert upper(mixed[at:]) == expected(mixed[at:]), at


@pytest.mark.parametrize("noise", [b"\x80\xc0\xf8\xffabz", b"hola servidor\n"],
                         ids=["not-utf8", "ascii-text"])
@pytest.mark.parametrize("sequence", ["\u0131", "ŉ", "ΐ", "ß", "é", "€"])
def test_sparse_sequences_and_length_changes_in_blocks(
        c_build: Callable[[bytes], bytes], noise: bytes, sequence: str) -> None:
    """Input that is not dense multi-byte text (random bytes, or ASCII text with a character
    here and there) goes by blocks: every character is patched where it lies, and a mapping of
    another length starts the next block right after it, wherever that is; the input's last
    bytes (fewer than eight, or part of a block) come after. Every length of the end."""
    rng = random.Random(sequence)
    data = bytearray(bytes(rng.choice(noise) for _ in range(6000)))
    for at in sorted(rng.sample(range(len(data)), 150), reverse=True):
        data[at:at] = sequence.encode()
    for cut in range(len(data) - 20, len(data) + 1):
        assert c_build(bytes(data[:cut])) == expected(bytes(data[:cut])), cut


def test_random_bytes_in_c(c_build: Callable[[bytes], bytes]) -> None:
    for seed in range(20):
        data = random.Random(seed).randbytes(70_000)
        assert c_build(data) == expected(data)


def test_large_inputs_from_many_threads() -> None:
    """The loop over large inputs runs without the GIL: threads must not disturb each other."""
    upper = c_upper()
    inputs = [("straße ΐ привет " * 2000).encode() + os.urandom(10000) for _ in range(4)]
    results: dict[int, bool] = {}

    def work(index: int) -> None:
        results[index] = all(upper(inputs[index]) == expected(inputs[index]) for _ in range(20))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == dict.fromkeys(range(4), True)


@pytest.mark.parametrize(("table", "error"), [
    ([], TypeError), ({"a": b"A"}, TypeError), ({0xE9: "É"}, TypeError),
    ({-1: b"x"}, ValueError), ({0xD800: b"x"}, ValueError), ({0x20000: b"x"}, ValueError),
    ({2**80: b"x"}, OverflowError), ({0xE9: b""}, ValueError), ({0xE9: b"x" * 13}, ValueError),
])
def test_bad_tables_are_refused(table: object, error: type[Exception]) -> None:
    if _speedups is None:
        pytest.skip("tcp_upper._speedups is not built")
    with pytest.raises(error):
        _speedups.make_upper(table)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", ["text", bytearray(b"x"), memoryview(b"x"), None])
def test_upper_takes_bytes_only(data: object) -> None:
    with pytest.raises(TypeError):
        c_upper()(data)  # type: ignore[arg-type]
