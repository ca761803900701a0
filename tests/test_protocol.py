"""docs/PROTOCOL.md §1, the wire protocol, checked on the sans-I/O core: no sockets, no clocks.

The caller's side of the contract (what the server does) is simulated by hand: ``settle()`` is what
the server calls after a quiet pause of HOLD_BACK_SECONDS, ``feed_eof()`` what it calls when a read
returns ``b""``.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Iterable
from types import ModuleType
from typing import Callable

import pytest
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_protocol import ReferenceProtocol

from tcp_upper import protocol as protocol_module
from tcp_upper.protocol import HOLD_BACK_SECONDS, MAX_BLANKS, Reply, UpperProtocol, is_command

try:
    from tcp_upper._speedups import find_command_line as c_find_command_line
except ImportError:  # no compiler at install time: only the regular expression is tested
    c_find_command_line = None  # type: ignore[assignment]

Search = Callable[[bytes, bool], int]


def search_function(name: str) -> Search:
    """The command search called *name*: "c" (the extension's, whatever TCP_UPPER_PURE_PYTHON
    says) or "regex" (the pure-Python one)."""
    if name == "c":
        if c_find_command_line is None:
            pytest.skip("tcp_upper._speedups is not built (no C compiler at install time)")
        return c_find_command_line
    return protocol_module._search_command_line


@pytest.fixture(autouse=True, params=["c", "regex"])
def search(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Search:
    """Every test here runs twice, UpperProtocol.feed searching for the command line in C and
    with the regular expression: both must give the same replies, whichever one casing chose
    for this run."""
    function = search_function(request.param)
    monkeypatch.setattr(protocol_module, "_find_command_line", function)
    return function

NFD_COMMAND = unicodedata.normalize("NFD", "DESCONEXIÓN")  # O + U+0301 COMBINING ACUTE ACCENT
assert NFD_COMMAND == "DESCONEXIO\u0301N"

#: Lines that are the disconnect command (without their line ending).
COMMAND_LINES = [
    "DESCONEXION",
    "desconexion",
    "DesConExIoN",
    "  DESCONEXION",
    "DESCONEXION   ",
    "\tDESCONEXION\t",
    " \t desconexion \t ",
    "DESCONEXIÓN",
    "desconexión",
    NFD_COMMAND,
    NFD_COMMAND.lower(),
    "  " + NFD_COMMAND + "\t",
    # The CR of a CRLF is a blank too, so leave room for it: see the test on the limit.
    " " * MAX_BLANKS + "DESCONEXION" + "\t" * (MAX_BLANKS - 1),
    "\t" * MAX_BLANKS + NFD_COMMAND + " " * (MAX_BLANKS - 1),
]

#: Lines that only look like the command: ordinary text, upper-cased back.
ORDINARY_LINES = [
    "no DESCONEXION",
    "DESCONEXIONES",
    "DESCONEXIÓNES",
    "DESCONEXION ES",
    "DESCONEXION.",
    "DESCON EXION",
    "DESCONEXIONN",
    "DESCONEXI",
    "DESCONEXIO",
    "xDESCONEXION",
    "DESCONEXION\u0301",  # a combining accent on the N: another letter
    "DESCONEXIO\u0301\u0301N",
    " " * (MAX_BLANKS + 1) + "DESCONEXION",
    "DESCONEXION" + " " * (MAX_BLANKS + 1),
    "\x0bDESCONEXION",  # vertical tab: not a blank (blanks are spaces and tabs)
    "",
    "   ",
]


def feed_all(chunks: Iterable[bytes], *, eof: bool = False) -> Reply:
    """Feed *chunks* to a new protocol (then end of stream if *eof*); all replies, final close."""
    protocol = UpperProtocol()
    out = b""
    close = False
    for chunk in chunks:
        reply = protocol.feed(chunk)
        assert not (close and reply.data), "bytes sent after the close"
        out += reply.data
        close = reply.close
    if eof:
        reply = protocol.feed_eof()
        assert reply.close, "feed_eof() must always close"
        assert not (close and reply.data), "bytes sent after the close"
        out += reply.data
        close = True
    return Reply(out, close)


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def close_offset(data: bytes) -> int | None:
    """Index of the byte whose arrival closes the connection (fed one byte at a time), if any."""
    protocol = UpperProtocol()
    for index in range(len(data)):
        if protocol.feed(data[index:index + 1]).close:
            return index
    return None


# --- Oracle: an independent reading of docs/PROTOCOL.md §1 ----------------------------------------

def oracle_is_command(line: str) -> bool:
    """The command: blanks (spaces, tabs; the CR of a CRLF at the end) around the word,
    at most MAX_BLANKS each side, any case, DESCONEXIÓN composed or decomposed."""
    body = line.lstrip(" \t")
    if len(line) - len(body) > 32:
        return False
    word = body.rstrip(" \t\r")
    if len(body) - len(word) > 32:
        return False
    return unicodedata.normalize("NFC", word).casefold() in ("desconexion", "desconexi\u00f3n")


def oracle(data: bytes, *, eof: bool) -> Reply:
    """Expected replies for a whole stream: upper-case of everything before the first command
    line; a final line without newline counts only at end of stream."""
    out = []
    lines = data.split(b"\n")
    complete, last = lines[:-1], lines[-1]
    for line in complete:
        text = line.decode("utf-8", "surrogateescape")
        if oracle_is_command(text):
            return Reply(b"".join(out), True)
        out.append(text.upper().encode("utf-8", "surrogateescape") + b"\n")
    if eof:
        text = last.decode("utf-8", "surrogateescape")
        if not oracle_is_command(text):
            out.append(text.upper().encode("utf-8", "surrogateescape"))
        return Reply(b"".join(out), True)
    # Without end of stream the last line may still be held back (up to a small bound).
    return Reply(b"".join(out), False)


def surrogateescape_upper(data: bytes) -> bytes:
    return data.decode("utf-8", "surrogateescape").upper().encode("utf-8", "surrogateescape")


def test_oracle_agrees_with_is_command_on_the_named_examples() -> None:
    for line in COMMAND_LINES:
        assert oracle_is_command(line), line
    for line in ORDINARY_LINES:
        assert not oracle_is_command(line), line


# --- "any bytes": answered as soon as they arrive -----------------------------------------------

def test_bytes_are_answered_as_soon_as_they_arrive_without_waiting_for_a_newline() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"hola servidor") == Reply(b"HOLA SERVIDOR", False)
    assert protocol.feed(b", que tal") == Reply(b", QUE TAL", False)
    assert protocol.feed(b"\nuno\ndos") == Reply(b"\nUNO\nDOS", False)
    assert not protocol.holding


def test_no_framing_is_added_or_removed() -> None:
    data = b"a\n\nb\r\n\r\nc\rd\r\r\n"
    assert feed_all([data]) == Reply(data.upper(), False)


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_line_ending_is_mirrored(ending: bytes) -> None:
    assert feed_all([b"hola servidor" + ending]) == Reply(b"HOLA SERVIDOR" + ending, False)
    assert feed_all([b"uno" + ending + b"dos" + ending]) == Reply(
        b"UNO" + ending + b"DOS" + ending, False)


@pytest.mark.parametrize("text", ["hola", "hola servidor", "dato", "Diego", "d e"])
def test_bare_text_that_cannot_be_the_command_is_answered_at_once_not_held(text: str) -> None:
    protocol = UpperProtocol()
    assert protocol.feed(text.encode()) == Reply(text.upper().encode(), False)
    assert not protocol.holding


def test_a_line_start_that_could_be_the_command_is_held_until_the_next_byte_settles_it() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"hola\ndes") == Reply(b"HOLA\n", False)
    assert protocol.holding
    assert protocol.feed(b"ayuno\n") == Reply(b"DESAYUNO\n", False)
    assert not protocol.holding


def test_empty_data_is_not_end_of_stream() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"") == Reply(b"", False)
    assert not protocol.closed
    assert protocol.feed(b"hola\n") == Reply(b"HOLA\n", False)


def test_hold_back_pause_is_short() -> None:
    # docs/PROTOCOL.md: "a short quiet pause (about 0.2 s, a named constant)".
    assert 0.05 <= HOLD_BACK_SECONDS <= 0.5


# --- UTF-8 text ----------------------------------------------------------------------------------

UNICODE_CASES = [
    ("ñandú", "ÑANDÚ"),
    ("straße", "STRASSE"),
    ("árbol, pingüino, acción", "ÁRBOL, PINGÜINO, ACCIÓN"),
    ("σοφία", "ΣΟΦΊΑ"),
    ("ﬁn", "FIN"),
    ("日本語 ok", "日本語 OK"),
    ("emoji 🙂 ok", "EMOJI 🙂 OK"),
]


@pytest.mark.parametrize(("text", "upper"), UNICODE_CASES)
def test_utf8_text_is_upper_cased_with_unicode_rules(text: str, upper: str) -> None:
    assert feed_all([text.encode() + b"\n"]) == Reply(upper.encode() + b"\n", False)
    assert feed_all([text.encode()], eof=True) == Reply(upper.encode(), True)


@pytest.mark.parametrize(("text", "upper"), UNICODE_CASES)
def test_a_character_split_across_two_reads_is_still_right(text: str, upper: str) -> None:
    data = text.encode() + b"\n"
    for split in range(1, len(data)):
        assert feed_all([data[:split], data[split:]]) == Reply(upper.encode() + b"\n", False), split
    assert feed_all(one_byte_at_a_time(data)) == Reply(upper.encode() + b"\n", False)


def test_a_split_character_is_answered_as_soon_as_it_is_complete() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"a\xc3") == Reply(b"A", False)  # the half of ñ waits in the decoder
    assert protocol.feed(b"\xb1") == Reply("Ñ".encode(), False)


# --- bytes that are not UTF-8 --------------------------------------------------------------------

INVALID_UTF8 = {
    "lone continuation byte": b"\x80",
    "continuation bytes": b"\xbf\x80\xaf",
    "byte ff": b"\xff",
    "byte fe": b"\xfe",
    "latin-1 text": "canción".encode("latin-1"),
    "start byte then ascii": b"\xc3a",
    "truncated 3-byte sequence then ascii": b"\xe2\x82z",
    "truncated 4-byte sequence then ascii": b"\xf0\x9f\x99z",
    "surrogate encoding ED A0 80": b"\xed\xa0\x80",
    "surrogate pair encoding": b"\xed\xa0\xbd\xed\xb8\x82",
    "overlong slash C0 AF": b"\xc0\xaf",
    "overlong 3-byte": b"\xe0\x80\xaf",
    "overlong 4-byte": b"\xf0\x80\x80\xaf",
    "above U+10FFFF": b"\xf4\x90\x80\x80",
    "5-byte form": b"\xf8\x88\x80\x80\x80",
    "NUL and controls": b"\x00\x01\x1b[0m",
}


@pytest.mark.parametrize("bad", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_bytes_that_are_not_utf8_pass_through_unchanged(bad: bytes) -> None:
    data = b"hola " + bad + b" mundo\n"
    expected = data.upper()  # bytes.upper() touches ASCII letters only
    assert expected == surrogateescape_upper(data)  # the model agrees with the hand-made answer
    assert feed_all([data]) == Reply(expected, False)
    assert feed_all(one_byte_at_a_time(data)) == Reply(expected, False)
    assert feed_all([data], eof=True) == Reply(expected, True)


@pytest.mark.parametrize("tail", [b"\xc3", b"\xe2\x82", b"\xf0\x9f\x99", b"\xed\xa0"],
                         ids=["2-byte", "3-byte", "4-byte", "surrogate"])
def test_a_truncated_sequence_at_end_of_stream_is_flushed_unchanged(tail: bytes) -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"hola " + tail) == Reply(b"HOLA ", False)
    assert protocol.feed_eof() == Reply(tail, True)


def test_invalid_bytes_inside_a_held_line_start_are_released_unchanged() -> None:
    assert feed_all([b"DESCON\xff\n"]) == Reply(b"DESCON\xff\n", False)
    assert feed_all([b"DESCONEXI", b"\xc3"], eof=True) == Reply(b"DESCONEXI\xc3", True)


# --- empty lines ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"\n", b"\r\n", b"\n\n\n", b"a\n\nb\n", b"\r\n\r\nx\r\n"])
def test_an_empty_line_is_answered_with_an_empty_line(data: bytes) -> None:
    assert feed_all([data]) == Reply(data.upper(), False)
    assert feed_all(one_byte_at_a_time(data)) == Reply(data.upper(), False)


# --- DESCONEXION ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("line", COMMAND_LINES)
def test_the_command_line_closes_after_delivering_earlier_replies(line: str, ending: bytes) -> None:
    protocol = UpperProtocol()
    data = b"hola servidor\n" + line.encode() + ending + b"despues\n"
    assert protocol.feed(data) == Reply(b"HOLA SERVIDOR\n", True)
    assert protocol.closed
    assert is_command(line)


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_the_command_as_the_very_first_line_sends_nothing(line: str) -> None:
    assert feed_all([line.encode() + b"\n"]) == Reply(b"", True)


def test_after_the_command_every_call_returns_an_empty_closing_reply() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"uno\nDESCONEXION\ndos\n") == Reply(b"UNO\n", True)
    assert protocol.feed(b"tres\n") == Reply(b"", True)
    assert protocol.feed(b"DESCON") == Reply(b"", True)
    assert protocol.settle() == Reply(b"", True)
    assert protocol.feed_eof() == Reply(b"", True)
    assert not protocol.holding


@pytest.mark.parametrize("line", ["DESCONEXION", "  desconexión\t", NFD_COMMAND])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_the_command_split_at_every_byte_position_still_closes(line: str, ending: bytes) -> None:
    data = b"hola\n" + line.encode() + ending + b"resto\n"
    newline = len(b"hola\n") + len(line.encode()) + len(ending) - 1
    assert data[newline:newline + 1] == b"\n"
    for split in range(1, len(data)):
        protocol = UpperProtocol()
        first = protocol.feed(data[:split])
        second = protocol.feed(data[split:])
        assert first.data + second.data == b"HOLA\n", split
        assert first.close == (split > newline), split
        assert second.close, split
    assert feed_all(one_byte_at_a_time(data)) == Reply(b"HOLA\n", True)
    assert close_offset(data) == newline


@pytest.mark.parametrize("line", ["DESCONEXION", "desconexión", NFD_COMMAND, " DESCONEXION\t "])
def test_a_bare_command_closes_after_the_quiet_pause(line: str) -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"hola\n" + line.encode()) == Reply(b"HOLA\n", False)
    assert protocol.holding  # nothing of the command was sent
    assert protocol.settle() == Reply(b"", True)
    assert protocol.closed


@pytest.mark.parametrize("line", ["DESCONEXION", "desconexión", NFD_COMMAND, "DESCONEXION\r"])
def test_a_bare_command_closes_at_once_on_end_of_stream(line: str) -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"hola\n" + line.encode()) == Reply(b"HOLA\n", False)
    assert protocol.feed_eof() == Reply(b"", True)


def test_bytes_after_the_command_in_the_same_read_are_discarded() -> None:
    assert feed_all([b"a\nDESCONEXION\nb\nc", b"d\n"], eof=True) == Reply(b"A\n", True)


@pytest.mark.parametrize("line", ORDINARY_LINES)
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_lines_that_only_look_like_the_command_are_ordinary_text(line: str, ending: bytes) -> None:
    data = line.encode() + ending + b"sigo\n"
    expected = Reply(line.upper().encode() + ending + b"SIGO\n", False)
    assert feed_all([data]) == expected
    assert feed_all(one_byte_at_a_time(data)) == expected
    assert not is_command(line)


@pytest.mark.parametrize(("trailing", "ending", "command"), [
    (MAX_BLANKS, b"\n", True),
    (MAX_BLANKS + 1, b"\n", False),
    (MAX_BLANKS - 1, b"\r\n", True),
    (MAX_BLANKS, b"\r\n", False),  # contract: "Blanks are spaces and tabs (and the CR of a CRLF)"
])
def test_at_most_max_blanks_trailing_blanks_are_considered(
        trailing: int, ending: bytes, command: bool) -> None:
    line = b"DESCONEXION" + b" " * trailing
    expected = Reply(b"", True) if command else Reply(line + ending + b"X\n", False)
    assert feed_all([line + ending + b"x\n"]) == expected
    assert feed_all(one_byte_at_a_time(line + ending + b"x\n")) == expected


@pytest.mark.parametrize(("leading", "command"), [(MAX_BLANKS, True), (MAX_BLANKS + 1, False)])
def test_at_most_max_blanks_leading_blanks_are_considered(leading: int, command: bool) -> None:
    line = b"\t" * leading + b"desconexion"
    expected = Reply(b"", True) if command else Reply(line.upper() + b"\r\nX\n", False)
    assert feed_all([line + b"\r\nx\n"]) == expected
    assert feed_all(one_byte_at_a_time(line + b"\r\nx\n")) == expected


def test_desconexion_then_es_in_a_later_read_is_desconexiones() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"DESCONEXION") == Reply(b"", False)
    assert protocol.holding
    assert protocol.feed(b"ES\n") == Reply(b"DESCONEXIONES\n", False)
    assert not protocol.closed


def test_descon_then_exion_in_a_later_read_disconnects() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"DESCON") == Reply(b"", False)
    assert protocol.feed(b"EXION\n") == Reply(b"", True)


def test_a_held_prefix_released_by_the_pause_makes_the_rest_of_its_line_ordinary_text() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"descon") == Reply(b"", False)
    assert protocol.settle() == Reply(b"DESCON", False)
    assert not protocol.holding
    # The line was decided as text: its end does not make it the command any more.
    assert protocol.feed(b"exion\n") == Reply(b"EXION\n", False)
    # The next line is judged afresh.
    assert protocol.feed(b"DESCONEXION\n") == Reply(b"", True)


def test_settle_without_anything_held_changes_nothing() -> None:
    protocol = UpperProtocol()
    assert protocol.settle() == Reply(b"", False)
    assert protocol.feed(b"hola") == Reply(b"HOLA", False)
    assert protocol.settle() == Reply(b"", False)
    assert protocol.feed(b"\nDESCONEXION\n") == Reply(b"\n", True)


def test_end_of_stream_flushes_a_held_prefix_that_is_not_the_command() -> None:
    protocol = UpperProtocol()
    assert protocol.feed(b"uno\ndescon") == Reply(b"UNO\n", False)
    assert protocol.feed_eof() == Reply(b"DESCON", True)


def test_end_of_stream_with_nothing_pending_closes_with_nothing() -> None:
    assert UpperProtocol().feed_eof() == Reply(b"", True)


# --- the held-back part stays small --------------------------------------------------------------

def test_leading_blanks_beyond_max_blanks_release_the_line_as_text() -> None:
    protocol = UpperProtocol()
    sent = b""
    for count in range(1, MAX_BLANKS + 2):
        reply = protocol.feed(b" ")
        sent += reply.data
        if count <= MAX_BLANKS:
            assert protocol.holding and sent == b"", count
    assert sent == b" " * (MAX_BLANKS + 1)
    assert not protocol.holding
    assert protocol.feed(b"DESCONEXION\n") == Reply(b"DESCONEXION\n", False)


@pytest.mark.parametrize("line", [
    " " * MAX_BLANKS + NFD_COMMAND + " \t" * (MAX_BLANKS // 2) + "x",
    "\t" * MAX_BLANKS + "DESCONEXION" + " " * (MAX_BLANKS + 5),
    " " * (MAX_BLANKS * 3),
    "DESCONEXION" + "\r" * (MAX_BLANKS * 3),
])
def test_held_back_bytes_stay_bounded_whatever_is_fed(line: str) -> None:
    # Longest possible held part: blanks, the decomposed command, blanks (ASCII blanks: 1 byte).
    bound = 2 * MAX_BLANKS + len(NFD_COMMAND.encode())
    protocol = UpperProtocol()
    sent = 0
    for fed, byte in enumerate(one_byte_at_a_time(line.encode()), start=1):
        reply = protocol.feed(byte)
        assert not reply.close
        sent += len(reply.data)
        assert fed - sent <= bound
        assert protocol.holding == (fed > sent)
    assert not protocol.holding  # too long to be the command: everything went out


def test_a_huge_line_without_newline_streams_through_chunk_by_chunk() -> None:
    protocol = UpperProtocol()
    pattern = b"abc desconexion xyz \t DESCON-"  # awkward text, no newline
    chunk_size = 64 * 1024
    base = (pattern * (chunk_size // len(pattern) + 1))[:chunk_size]
    first = protocol.feed(b"hola\nDESCONEX")
    assert first == Reply(b"HOLA\n", False) and protocol.holding
    # The held line start goes out with the first chunk that decides it; then chunk for chunk.
    reply = protocol.feed(base)
    assert reply == Reply(b"DESCONEX" + base.upper(), False)
    for index in range(256):  # 16 MiB in all
        chunk = base[index % 7:] + base[:index % 7]
        reply = protocol.feed(chunk)
        assert reply == Reply(chunk.upper(), False), index
        assert not protocol.holding
    assert protocol.feed(b"\nDESCONEXION\n") == Reply(b"\n", True)


def test_a_huge_line_of_multibyte_characters_split_anywhere_keeps_at_most_one_char_back() -> None:
    protocol = UpperProtocol()
    data = "ñ".encode() * (1 << 20)  # 2 MiB; Ñ has the same length in UTF-8
    fed = sent = 0
    size = 65537  # odd: every read ends inside a character
    for start in range(0, len(data), size):
        chunk = data[start:start + size]
        reply = protocol.feed(chunk)
        fed += len(chunk)
        sent += len(reply.data)
        assert 0 <= fed - sent <= 1
    assert fed == sent
    assert protocol.feed_eof() == Reply(b"", True)


# --- hypothesis properties -----------------------------------------------------------------------

# The search fixture is function-scoped, but the same for every example of a test: not reset
# between examples on purpose.
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
PROPERTY_SETTINGS = settings(deadline=None, max_examples=examples(150),
                             suppress_health_check=SUPPRESSED)

blanks = st.text(alphabet=" \t", max_size=MAX_BLANKS + 2)
trailing_blanks = st.text(alphabet=" \t\r", max_size=MAX_BLANKS + 2)


@st.composite
def command_words(draw: st.DrawFn) -> str:
    word = draw(st.sampled_from(["desconexion", "desconexi\u00f3n", "desconexio\u0301n"]))
    flags = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if up else c for c, up in zip(word, flags))


command_lines = st.builds(lambda a, w, b: a + w + b, blanks, command_words(), trailing_blanks)
command_prefixes = command_lines.flatmap(
    lambda line: st.integers(0, len(line)).map(lambda n: line[:n]))
near_misses = st.sampled_from(ORDINARY_LINES) | st.builds(
    lambda line, extra: line + extra, command_lines, st.sampled_from(["ES", "x", ".", "\u0301"]))
text_lines = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)),
                     max_size=20)
byte_lines = st.binary(max_size=20).map(lambda b: b.replace(b"\n", b""))
line_texts = st.one_of(command_lines, command_prefixes, near_misses, text_lines)
any_line = line_texts.map(lambda s: s.encode("utf-8")) | byte_lines
endings = st.sampled_from([b"\n", b"\r\n"])
streams = st.lists(st.tuples(any_line, endings), max_size=8).map(
    lambda lines: b"".join(line + ending for line, ending in lines))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *cuts})
    return [data[a:b] for a, b in zip(points, points[1:])]


@PROPERTY_SETTINGS
@given(data=streams, draw=st.data())
def test_replies_do_not_depend_on_how_a_newline_terminated_stream_is_split(
        data: bytes, draw: st.DataObject) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=12), label="cuts")
    chunks = split(data, cuts)
    whole = feed_all([data])
    assert feed_all(chunks) == whole
    assert feed_all(chunks, eof=True) == feed_all([data], eof=True)
    # Where it closed: in the read holding the newline that ends the command line.
    where = close_offset(data)
    assert (where is not None) == whole.close
    protocol = UpperProtocol()
    start = 0
    for chunk in chunks:
        closed = protocol.feed(chunk).close
        end = start + len(chunk)
        assert closed == (where is not None and where < end)
        start = end


@PROPERTY_SETTINGS
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
       draw=st.data())
def test_valid_utf8_text_without_the_command_comes_back_upper_cased(
        text: str, draw: st.DataObject) -> None:
    data = text.encode()
    expected = oracle(data, eof=True)
    if expected.data != text.upper().encode():  # the text happened to contain the command
        return
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=8), label="cuts")
    assert feed_all(split(data, cuts), eof=True) == Reply(text.upper().encode(), True)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=300), draw=st.data())
def test_arbitrary_bytes_without_the_command_pass_through_except_upper_casing(
        data: bytes, draw: st.DataObject) -> None:
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    if any(oracle_is_command(line) for line in lines):
        return
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=8), label="cuts")
    assert feed_all(split(data, cuts), eof=True) == Reply(surrogateescape_upper(data), True)


@PROPERTY_SETTINGS
@given(lines=st.lists(st.tuples(any_line, endings), max_size=8), last=any_line,
       eof=st.booleans(), draw=st.data())
def test_output_is_everything_before_the_first_command_line_upper_cased(
        lines: list[tuple[bytes, bytes]], last: bytes, eof: bool, draw: st.DataObject) -> None:
    data = b"".join(line + ending for line, ending in lines) + last
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=8), label="cuts")
    got = feed_all(split(data, cuts), eof=eof)
    expected = oracle(data, eof=eof)
    if eof or expected.close:
        assert got == expected
    else:
        # The unterminated last line may be partly held back, never more than a few bytes.
        assert got.close is False
        full = expected.data + surrogateescape_upper(last)
        assert full.startswith(got.data)
        assert len(full) - len(got.data) <= 4 * (2 * MAX_BLANKS + len(NFD_COMMAND))


# --- The fast path against the per-line classifier ---------------------------------------------

FORMS = ("desconexion", "desconexi\u00f3n")  # the command words after NFC and case folding


def matches_fast_path(line: str) -> bool:
    """Whether the command search in use finds *line* (one line, no newline) as a complete
    command line, after another line and at the start of a chunk that starts a line."""
    data = line.encode("utf-8", "surrogateescape") + b"\n"
    found = protocol_module._find_command_line(b"x\n" + data, False)
    assert found in (-1, 2)
    assert protocol_module._find_command_line(data, True) == (0 if found == 2 else -1)
    return found == 2


def every_code_point_folded() -> list[tuple[str, str]]:
    """Each code point but the newline, with ``casefold(NFC(c))``: one call in C for all.

    The newline separates them; it composes with nothing and is a starter, so normalising the
    joined text normalises each code point on its own.
    """
    chars = [chr(c) for c in range(sys.maxunicode + 1) if c != 0x0A]
    folded = unicodedata.normalize("NFC", "\n".join(chars)).casefold().split("\n")
    assert len(folded) == len(chars)
    return list(zip(chars, folded))


def combining_candidates(folded: list[tuple[str, str]]) -> list[str]:
    """Code points that NFC may merge with the letter before them: combining marks, code points
    that NFC changes on their own, and the second half of every canonical decomposition."""
    seconds = set()
    for char, _ in folded:
        parts = unicodedata.decomposition(char).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            seconds.add(chr(int(parts[1], 16)))
    return [char for char, _ in folded
            if unicodedata.combining(char) or char in seconds
            or unicodedata.normalize("NFC", char) != char]


def test_the_spellings_of_the_command_derived_from_the_classifier_are_those_the_scanner_finds(
) -> None:
    """Brute force over every code point: wherever a code point can stand for letters of the
    command (substituted for them, or inserted after a letter so that NFC merges it), the
    classifier and the chunk scanner agree; and the non-ASCII spellings are exactly these."""
    folded = every_code_point_folded()
    accepted: set[tuple[str, str]] = set()  # (what it replaces or follows, the code point)
    for char, key in folded:
        for form in FORMS:
            start = form.find(key) if key else -1
            while start >= 0:
                word = form[:start] + char + form[start + len(key):]
                command = protocol_module._classify(word) is protocol_module._Line.COMMAND
                assert matches_fast_path(word) == command, (hex(ord(char)), word)
                if command and not char.isascii():
                    accepted.add((key, char))
                start = form.find(key, start + 1)
    for char in combining_candidates(folded):
        for form in FORMS:
            for index in range(len(form) + 1):
                for letter_case in (str.lower, str.upper):
                    word = letter_case(form[:index]) + char + letter_case(form[index:])
                    command = protocol_module._classify(word) is protocol_module._Line.COMMAND
                    assert matches_fast_path(word) == command, (hex(ord(char)), word)
                    if command:
                        accepted.add((word[index - 1] if index else "", char))
    assert accepted == {("s", "\u017f"), ("\u00f3", "\u00f3"), ("\u00f3", "\u00d3"),
                        ("o", "\u0301"), ("O", "\u0301"), ("o", "\u0341"), ("O", "\u0341")}


def check_same_as_reference(chunks: list[bytes], settles: list[bool], eof: bool) -> None:
    """Feed both implementations the same calls; every reply and state must be equal."""
    fast, reference = UpperProtocol(), ReferenceProtocol()
    for chunk, settle in zip(chunks, settles):
        assert fast.feed(chunk) == reference.feed(chunk), chunk
        assert (fast.holding, fast.closed) == (reference.holding, reference.closed)
        if settle:
            assert fast.settle() == reference.settle()
            assert (fast.holding, fast.closed) == (reference.holding, reference.closed)
    if eof:
        assert fast.feed_eof() == reference.feed_eof()
    assert (fast.holding, fast.closed, fast.command_seen) == (
        reference.holding, reference.closed, reference.command_seen)


@st.composite
def spelled_words(draw: st.DrawFn) -> str:
    """The command word, in any of the spellings the classifier accepts."""
    letters = []
    for letter in "desconexi\u00f3n":
        if letter == "s":
            options = ["s", "S", "\u017f"]
        elif letter == "\u00f3":
            options = ["o", "O", "\u00f3", "\u00d3", "o\u0301", "O\u0301", "o\u0341", "O\u0341"]
        else:
            options = [letter, letter.upper()]
        letters.append(draw(st.sampled_from(options)))
    return "".join(letters)


@st.composite
def tricky_words(draw: st.DrawFn) -> str:
    """The command word with every spelling the classifier accepts, sometimes cut or spoilt."""
    word = draw(spelled_words())
    cut = draw(st.integers(0, len(word) + 2))
    spoil = draw(st.sampled_from(["", "", "", "ES", "x", "\u0301", " x", "N", "\u00e9"]))
    return word[:cut] + spoil


tricky_command_lines = st.builds(lambda a, w, b: a + w + b, blanks, tricky_words(),
                                trailing_blanks)
tricky_pieces = st.one_of(
    tricky_command_lines,
    st.sampled_from(["d", "D", " ", "\t", "\r", "\n", "\r\n", "D\nx", "\u017f", "\u00d3",
                     "\u0301", "\u00f1", "x" * 40]),
    text_lines,
)
tricky_lines = st.one_of(
    tricky_command_lines.map(str.encode),  # whole lines, most likely to be the command
    st.lists(tricky_pieces, max_size=6).map(lambda parts: "".join(parts).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"\xc3", b"\x93", b"\xc5", b"\xcc", b"\xff", b"\xe2\x82"]),
)
tricky_streams = st.lists(st.tuples(tricky_lines, st.sampled_from([b"\n", b"\r\n", b""])),
                          max_size=10).map(lambda parts: b"".join(a + b for a, b in parts))


# --- The command search on its own ----------------------------------------------------------

def first_command_line(chunk: bytes, at_line_start: bool) -> int:
    """The oracle of the search: where the first complete line that _classify calls the
    command starts (the first line of *chunk* is one only when *at_line_start*), or -1."""
    start = 0
    for index, line in enumerate(chunk.split(b"\n")[:-1]):  # the complete lines
        text = line.decode("utf-8", "surrogateescape")
        if ((index or at_line_start)
                and protocol_module._classify(text) is protocol_module._Line.COMMAND):
            return start
        start += len(line) + 1
    return -1


blank_runs = st.builds(lambda blank, count: blank * count,
                       st.sampled_from([" ", "\t", "\r", " \t", "\r ", "\x0b", "\x0c "]),
                       st.integers(0, MAX_BLANKS + 2))
search_pieces = st.one_of(
    # Whole lines that are often the command, or miss it by a blank too many, a missing newline.
    st.builds(lambda a, w, b, end: a + w + b + end, blank_runs, spelled_words(), blank_runs,
              st.sampled_from(["\n", "\r\n", ""])),
    tricky_words(), blank_runs,
    st.sampled_from(["\n", "\r\n", "x", "X", "exi", "de", "desco", "nexion", "\u017f", "\u00d3",
                     "\u00f3", "\u0301", "\u0341"]),
    text_lines,
).map(lambda piece: piece.encode())
search_chunks = st.lists(st.one_of(
    search_pieces,
    st.binary(max_size=12),
    st.sampled_from([b"\xc3", b"\xc5", b"\xcc", b"\xcd", b"\x81", b"\x93", b"\xb3", b"\xbf"]),
), max_size=14).map(b"".join)


@settings(deadline=None, max_examples=examples(1000), suppress_health_check=SUPPRESSED)
@given(chunk=search_chunks, at_line_start=st.booleans())
def test_the_search_finds_the_first_command_line_as_the_classifier_does(
        search: Search, chunk: bytes, at_line_start: bool) -> None:
    assert search(chunk, at_line_start) == first_command_line(chunk, at_line_start)


WORD = b"desconexion"


@pytest.mark.parametrize(("chunk", "at_line_start", "found"), [
    (WORD + b"\n", True, 0),
    (WORD + b"\n", False, -1),  # the chunk starts inside a line
    (b"a\n" + WORD + b"\n", False, 2),
    (b" " * MAX_BLANKS + WORD + b"\n", True, 0),
    (b" " * (MAX_BLANKS + 1) + WORD + b"\n", True, -1),
    (b"a\n" + b"\t" * MAX_BLANKS + b"DESCONEXION\n", False, 2),
    (b"a\n" + b"\t" * (MAX_BLANKS + 1) + b"DESCONEXION\n", False, -1),
    (b"\n" + b" \t" * (MAX_BLANKS // 2) + WORD + b"\n", False, 1),
    (WORD + b" " * MAX_BLANKS + b"\n", True, 0),
    (WORD + b" " * (MAX_BLANKS + 1) + b"\n", True, -1),
    (WORD + b"\r" * MAX_BLANKS + b"\n", True, 0),
    (WORD + b"\t" * (MAX_BLANKS - 1) + b"\r\n", True, 0),
    (WORD + b"\t" * MAX_BLANKS + b"\r\n", True, -1),
    (b"\r" + WORD + b"\n", True, -1),  # a CR is a blank only after the word
    (WORD + b"\x0b\n", True, -1),  # nor is a vertical tab or a form feed, anywhere
    (b"\x0c" + WORD + b"\n", True, -1),
    (b"a\n \r" + WORD + b"\n", False, -1),
    (b"desco nexion\n", True, -1),
    (b"desconexi on\n", True, -1),
    (b"x " + WORD + b"\n", True, -1),
    (WORD + b"es\n", True, -1),
    (WORD, True, -1),  # no newline: the line is not complete
    (WORD + b" \r", True, -1),
    (b"a\nDESCONEXI\xc3\x93", False, -1),
    (b"a\nDESCONEXI\xc3\x93N", False, -1),
    (b"hola\nDE\xc5\xbfCONEXIO\xcd\x81N\r\n", False, 5),
    (b"hola\nde\xc5\xbfconexio\xcc\x81n \n", False, 5),
    (b"desconexi\xc3\xb3n\n", True, 0),
    (b"desconexi\xc3\xb3\xcc\x81n\n", True, -1),
    (b"desconexio\xcc\x81\xcc\x81n\n", True, -1),
    (b"desconexio\xcc\x80n\n", True, -1),  # U+0300, a grave accent
    (b"de\xc5\xbf\xc5\xbfconexion\n", True, -1),
    (b"de\xbfconexion\n", True, -1),  # half of U+017F
    (b"DESCONEXIONES\nx\n  Desconexi\xc3\xb3n\t\n" + WORD + b"\n", True, 16),
], ids=repr)
def test_the_search_at_the_limits(
        search: Search, chunk: bytes, at_line_start: bool, found: int) -> None:
    assert first_command_line(chunk, at_line_start) == found  # the oracle agrees
    assert search(chunk, at_line_start) == found


@pytest.fixture
def portable_search(portable_speedups: ModuleType) -> Search:
    """The command search of the C extension built without SSE2 (the plain C scan)."""
    function: Search = portable_speedups.find_command_line
    return function


@settings(deadline=None, max_examples=examples(300), suppress_health_check=SUPPRESSED)
@given(chunk=search_chunks, at_line_start=st.booleans(), pad=st.integers(0, 80))
def test_the_portable_c_search_answers_as_the_others(
        search: Search, portable_search: Search, chunk: bytes, at_line_start: bool,
        pad: int) -> None:
    chunk = b"#" * pad + chunk  # moves the chunk across the scan's steps
    assert portable_search(chunk, at_line_start) == search(chunk, at_line_start)


@pytest.mark.parametrize("filler", [b"a", b"exi", b"x desconexion ", b"\xc3\xb1", b"\n"])
def test_the_search_finds_the_command_at_every_offset(
        search: Search, portable_search: Search, filler: bytes) -> None:
    """The C scans take 64 (SSE2) or 8 positions a step: the command's X at every offset of the
    first steps, after look-alikes at every offset too."""
    for at in range(150):
        head = (filler * 150)[:at]
        for tail in (b"", b"DESCONEXION x\n" * 6):
            data = head + b"\n" + WORD + b"\n" + tail
            assert first_command_line(data, False) == at + 1  # the oracle agrees
            assert search(data, False) == portable_search(data, False) == at + 1, (at, tail)


@pytest.mark.parametrize("line", [b"x desconexion", b"desco nexion", b" " * 40 + WORD, b"d",
                                  b"x" * 50, b"exi" * 20, b"desconexiones", b"\xff" * 30])
def test_the_search_in_large_chunks_of_look_alikes(
        search: Search, portable_search: Search, line: bytes) -> None:
    """The scans' steps and their ends: the command after any number of look-alike lines."""
    for count in (0, 1, 2, 3, 5, 7, 100, 5000):
        body = (line + b"\n") * count
        for function in (search, portable_search):
            assert function(body, True) == -1, count
            for command in (WORD + b"\n", b"\t" + WORD + b"\r\n",
                            b"de\xc5\xbfconexi\xc3\xb3n\n"):
                assert function(body + command + body, True) == len(body), (count, command)


@settings(deadline=None, max_examples=examples(400), suppress_health_check=SUPPRESSED)
@given(data=tricky_streams, draw=st.data(), eof=st.booleans())
def test_the_fast_path_answers_exactly_as_the_per_line_reference_in_any_chunking(
        data: bytes, draw: st.DataObject, eof: bool) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=12), label="cuts")
    chunks = split(data, cuts)
    settles = draw.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)),
                        label="settle after")
    check_same_as_reference(chunks, settles, eof)


@pytest.mark.parametrize("line", [b"d", b"D\nx", b" x", b"DESCONEXIONES", b"xdesconexion",
                                  b"  desconexi\xc3\xb3n\r", b"\xff\xfe", "\u00f1".encode() * 31])
def test_big_chunks_of_one_line_repeated_match_the_reference(line: bytes) -> None:
    data = (line + b"\n") * 20000
    for size in (65536, 4093):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        check_same_as_reference([*chunks, b"  DESCONEXION\r\n", b"after"],
                                [False] * (len(chunks) + 2), eof=True)


@pytest.mark.parametrize("line", COMMAND_LINES + ORDINARY_LINES)
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_a_line_among_kilobytes_of_text_is_found_as_the_reference_finds_it(
        line: str, ending: bytes) -> None:
    """One candidate in a big chunk (the sparse path of the scan), or many (the dense one)."""
    filler = "hola, ¿qué tal la conexión?\n".encode() * 150  # ~4 KiB, "conexi" now and then
    data = filler + line.encode() + ending + filler
    check_same_as_reference([data], [False], eof=False)
    near_misses = b"DESCONEXIONES\n" * 300  # "conexi" on every line
    check_same_as_reference([near_misses + line.encode() + ending + filler], [False], eof=True)


@pytest.mark.parametrize("extra", ["", "\u00b5", "\u00df", "\u00ff", "\u0100", "\udcff"])
def test_latin1_text_is_upper_cased_as_str_upper_does_whatever_else_it_holds(extra: str) -> None:
    """The Latin-1 table agrees with str.upper() on every code point below U+0100, and text
    holding one it cannot map (µ, ß, ÿ) or beyond Latin-1 (or not UTF-8) takes the long way."""
    text = "".join(chr(c) for c in range(0x20, 0x100)) + extra + "\n"
    data = text.encode("utf-8", "surrogateescape")
    expected = text.upper().encode("utf-8", "surrogateescape")
    assert feed_all([data]) == Reply(expected, False)
    assert feed_all(split(data, [7, 99, 100, 250])) == Reply(expected, False)  # split chars
