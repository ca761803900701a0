"""The tcp_upper wire protocol as pure logic: bytes in, bytes out, no I/O.

A :class:`UpperProtocol` is fed whatever a socket read returned and answers with the bytes to send
back and whether the client asked to leave. It knows nothing of sockets, threads, clocks or
logging, so every rule here can be tested by feeding it bytes in any chunking.

Rules (the contract is docs/PROTOCOL.md section 1):

- Every byte is answered as soon as it arrives, upper-cased (Unicode rules for UTF-8 text; bytes
  that are not UTF-8 pass through unchanged). No framing is added or removed: line endings are
  mirrored because they are just bytes.
- A line whose text, without surrounding blanks and in any letter case, is ``DESCONEXION`` or
  ``DESCONEXIÓN`` (composed or decomposed) is the disconnect command: it is never echoed, replies
  to everything before it are delivered, everything after it is discarded.
- The only thing ever held back is the start of the current line while it could still become
  that command (a few bytes). The caller settles it with :meth:`UpperProtocol.settle` after a
  quiet pause of :data:`HOLD_BACK_SECONDS`, or with :meth:`UpperProtocol.feed_eof`.

Upper-casing is per code point (Python's ``str.upper`` has no context-dependent upper mappings),
so upper-casing the pieces of a stream gives the same bytes as upper-casing the whole stream: the
replies never depend on how TCP split it.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from enum import Enum
from typing import Callable, NamedTuple

from .casing import c_find_command_line, incomplete_tail, upper

#: The disconnect command, in the forms recognised after NFC normalisation and case folding.
COMMANDS = tuple(unicodedata.normalize("NFC", word).casefold() for word in ("DESCONEXION",
                                                                            "DESCONEXIÓN"))

#: How long the caller waits for more bytes before settling a held-back line start: long enough
#: for the rest of a line split by the network, short enough that a person does not notice.
HOLD_BACK_SECONDS = 0.2

#: Blanks considered before and after the command. Bounded so the held-back part stays small.
MAX_BLANKS = 32

#: Longest held-back line start, in code points: blanks, the command (decomposed Ó is 2 code
#: points) and blanks (a CRLF's CR among them). Anything longer cannot be the command.
MAX_HELD = MAX_BLANKS + max(len(unicodedata.normalize("NFD", c)) for c in COMMANDS) + MAX_BLANKS

_BLANKS = " \t"
_TRAILING_BLANKS = " \t\r"  # the CR of a CRLF counts as a trailing blank

# --- Finding the command in a chunk at C speed ------------------------------------------------
#
# With the C extension in use (tcp_upper.casing decides), _speedups.find_command_line does the
# search below in one pass of its own, from the rule stated here; without it, this regular
# expression and its gate do it with bytes methods and the re engine.
#
# The lines that _classify calls the command are exactly: up to MAX_BLANKS spaces or tabs, the
# word, up to MAX_BLANKS spaces, tabs or CRs. In the word, after NFC and case folding, each letter
# can only be written as the ASCII letter in either case, except that S may also be LATIN SMALL
# LETTER LONG S (U+017F, case-folds to "s") and the last O may also be Ó or ó composed, or O/o
# followed by U+0301 COMBINING ACUTE ACCENT or U+0341 COMBINING ACUTE TONE MARK (NFC maps it to
# U+0301). tests/test_protocol.py derives that list again from _classify over every code point.
#
# The scan runs on ``bytes.lower()`` of the chunk (ASCII letters only: UTF-8 multi-byte sequences
# never contain ASCII bytes, so nothing else moves) and starts at the literal "conexi" that every
# form contains: the regular expression engine skips to it without starting a match at every
# line, so a chunk of short lines ("d\n" a million times) costs one pass in C. From there the
# pattern reads the end of the word and the blank or newline that must follow it (so the near
# miss DESCONEXIONES stops there), then fixed-width look-behinds check "de" + s or U+017F and walk
# the blanks back to the line start one at a time (a chain, so a non-blank stops it at once),
# and the rest checks the trailing blanks and the newline. Only complete lines are found here:
# the unfinished last line of a chunk is classified by _classify.
_S_FORMS = (b"s", "\u017f".encode())
# The last O: plain, composed (Ó, ó: 2 bytes) or followed by U+0301 / U+0341 (3 bytes).
_O_FORMS = (b"o", rb"\xc3[\x93\xb3]", rb"o[\xcc\xcd]\x81")


def _line_start_chain(before: bytes, level: int, *, at_start: bool) -> bytes:
    """Look-behinds: *level* blanks then *before* (a fixed-width pattern) end here, and a line
    starts right before the blanks.

    With *at_start*, the start of the chunk is a line start too (negative look-behind: nothing or
    a newline before).
    """
    blanks = rb"[ \t]{%d}" % level
    if at_start:
        here = rb"(?<![^\n]" + blanks + before + rb")"
    else:
        here = rb"(?<=\n" + blanks + before + rb")"
    if level == MAX_BLANKS:
        return here
    more = rb"(?<=[ \t]" + blanks + before + rb")"
    return (rb"(?:" + here + rb"|" + more
            + _line_start_chain(before, level + 1, at_start=at_start) + rb")")


def _command_line_pattern(*, at_start: bool) -> re.Pattern[bytes]:
    """A complete command line in a lower-cased chunk, found from its literal "conexi"."""
    # The byte after the word was the newline, or it was a blank and more may follow.
    tail = rb"(?:(?<=\n)|[ \t\r]{0,%d}\n)" % (MAX_BLANKS - 1)
    words = []
    for o in _O_FORMS:
        # The word and the byte after it, which must be a blank or the newline.
        word_end = o + rb"n[ \t\r\n]"
        heads = []
        for s in _S_FORMS:
            word = re.escape(b"de" + s) + rb"conexi" + word_end
            # The word, then no letter glued before it, then not more blanks before it than a
            # command may have: three cheap checks that stop most look-alikes ("xconexion",
            # "xdesconexion", 40 blanks and the word) before the chain walks any blank (it
            # would walk all 32 levels for each such line).
            heads.append(rb"(?<=" + word + rb")(?<![^\n \t]" + word + rb")"
                         + rb"(?<![ \t]{%d}" % (MAX_BLANKS + 1) + word + rb")"
                         + _line_start_chain(word, 0, at_start=at_start))
        # The end of the line is checked first, as a look-ahead: it is a short forward scan,
        # and a line with too many blanks or text after the word never reaches the chain.
        words.append(word_end + rb"(?=" + tail + rb")(?:" + rb"|".join(heads) + rb")")
    return re.compile(rb"conexi(?:" + rb"|".join(words) + rb")" + tail)


# A complete command line, in the lower-cased chunk; the first form when the chunk begins a line.
_COMMAND_LINE_AT_START = _command_line_pattern(at_start=True)
_COMMAND_LINE = _command_line_pattern(at_start=False)
# A gate before any of that, with no regular expression: in a copy where ASCII letters are lower
# case, blanks and CR are deleted, and the other forms of the word are folded (the lead byte of
# Ó/ó reads "o", of U+017F reads "s"; their second bytes and U+0301/U+0341 are deleted), every
# command line reads exactly "desconexion" between two newlines (or from the start of a chunk that
# starts a line). One translation and one bytes.find: a chunk that is all look-alikes (lines of
# DESCONEXIONES, the word inside a sentence, "x desconexion") costs two passes in C, never a match
# attempt per line. What the gate lets through (the word alone on a line, blanks inside it, or a
# command) goes to the exact pattern above.
_GATE_TABLE = bytes.maketrans(
    bytes(range(ord("A"), ord("Z") + 1)) + b"\xc3\xc5",
    bytes(range(ord("a"), ord("z") + 1)) + b"os")
_GATE_DELETE = b" \t\r\x93\xb3\xcc\xcd\x81\xbf"
_GATE_LINE = b"\ndesconexion\n"

# Every spelling of the command has an x or X: a chunk without either holds no command line.
# (Integers: `int in bytes` is a memchr, `bytes in bytes` first tries int() and fails.)
_X, _UPPER_X = ord("x"), ord("X")

# The bytes a command line can start with: a blank or the D of the word (any other first code
# point, a split one included, makes the line text).
_MAY_START_COMMAND = frozenset(b" \tdD")

# Longest line start, in UTF-8 bytes, that _classify can call anything but text.
_MAX_HELD_BYTES = 4 * MAX_HELD + 3  # + a split character's first bytes

# Line starts are decoded only to be classified: bytes that are not UTF-8 become lone
# surrogates, which are never the command.
_ERRORS = "surrogateescape"


class _Line(Enum):
    """What the start of a line can still turn into."""

    COMMAND = "command"  # it is the command (if the line ends here)
    PREFIX = "prefix"  # more text could make it the command
    TEXT = "text"  # ordinary text, whatever follows


def _classify(line: str) -> _Line:
    """Classify a line start (no newline in it) against the disconnect command."""
    if len(line) > MAX_HELD:
        return _Line.TEXT
    body = line.lstrip(_BLANKS)
    if len(line) - len(body) > MAX_BLANKS:
        return _Line.TEXT
    stripped = body.rstrip(_TRAILING_BLANKS)
    trailing = len(body) - len(stripped)
    if trailing > MAX_BLANKS:
        return _Line.TEXT
    word = unicodedata.normalize("NFC", stripped).casefold()
    if word in COMMANDS:
        return _Line.COMMAND
    if not trailing and any(command.startswith(word) for command in COMMANDS):
        # Still inside the word (no trailing blank yet), and a prefix of the command. A
        # decomposed Ó arrives as O then U+0301: "…O" is a prefix of DESCONEXION already.
        return _Line.PREFIX
    return _Line.TEXT


def is_command(line: str) -> bool:
    """True when *line* (one line, without its newline) is the disconnect command."""
    return _classify(line) is _Line.COMMAND


class Reply(NamedTuple):
    """What to do after feeding bytes: send ``data`` (may be empty), then close if ``close``."""

    data: bytes
    close: bool


class UpperProtocol:
    """One client connection's protocol state. Not thread-safe: one instance per connection.

    Call :meth:`feed` with every chunk read, :meth:`settle` when :attr:`holding` is true and no
    bytes came for :data:`HOLD_BACK_SECONDS`, and :meth:`feed_eof` when the read returned ``b""``
    (end of stream). Once a :class:`Reply` has ``close`` set, the connection is over: further
    calls return empty replies.

    A chunk costs a few passes in C whatever it says: a memchr for the X every command has;
    where there is one, the search for a command line (:data:`_find_command_line`); then one
    upper-casing call. Only its unfinished last line, a few bytes at most, is classified in
    Python.
    """

    def __init__(self) -> None:
        # The first bytes of a UTF-8 character split by the last read: upper-cased with the
        # rest of it, from the next read (casing.incomplete_tail says what the incremental
        # decoder would keep).
        self._split = b""
        # True when the next byte after _held starts a line (rather than continuing text).
        self._at_line_start = True
        # The undecided start of the current line, raw (a split character's first bytes too).
        self._held = b""
        self._holding = False  # _held has at least one whole character
        self._closed = False
        #: Whether the connection ended by the disconnect command (rather than end of stream).
        self.command_seen = False

    @property
    def holding(self) -> bool:
        """True when bytes are held back waiting to learn whether they are the command."""
        return self._holding

    @property
    def closed(self) -> bool:
        """True once the command was seen or the stream ended."""
        return self._closed

    def feed(self, data: bytes) -> Reply:
        """Feed bytes read from the client; return what to send now and whether to close.

        An empty *data* is not end of stream here (use :meth:`feed_eof`): it just returns an
        empty reply.
        """
        if self._closed or not data:
            return Reply(b"", self._closed)
        if (data.endswith(b"\n") and not self._held and not self._split and _X not in data
                and _UPPER_X not in data):
            # The usual request: whole lines, none with the X every command has.
            self._at_line_start = True
            return Reply(upper(data), False)
        if self._at_line_start:
            chunk = self._held + data if self._held else data
            self._held, self._holding = b"", False
        else:
            chunk = data
        line = _find_command_line(chunk, self._at_line_start)
        if line >= 0:
            return self._close(self._upper(chunk[:line]), command=True)
        last_newline = chunk.rfind(b"\n")
        if last_newline >= 0 or self._at_line_start:
            line = last_newline + 1  # where the unfinished last line starts
            if self._hold(chunk[line:]):
                return Reply(self._upper(chunk[:line]), False)
        self._at_line_start = False
        return Reply(self._upper(chunk), False)

    def settle(self) -> Reply:
        """Decide the held-back line start after a quiet pause.

        A bare command closes the connection; anything else is sent, and the rest of that line
        is ordinary text.
        """
        if self._closed or not self._holding:
            return Reply(b"", self._closed)
        held = self._held
        self._held, self._holding, self._at_line_start = b"", False, False
        if _classify(codecs.utf_8_decode(held, _ERRORS, False)[0]) is _Line.COMMAND:
            return self._close(b"", command=True)
        return Reply(self._upper(held), False)  # a split character's first bytes stay behind

    def feed_eof(self) -> Reply:
        """The client ended its stream: return the last bytes to send; ``close`` is always set."""
        if self._closed:
            return Reply(b"", True)
        if not self._at_line_start:  # a split character's first bytes are sent as they are
            return self._close(self._split, command=False)
        # A held-back start that is the bare command is not echoed; anything else is sent.
        if _classify(self._held.decode("utf-8", _ERRORS)) is _Line.COMMAND:
            return self._close(b"", command=True)
        return self._close(upper(self._held), command=False)

    def _close(self, data: bytes, *, command: bool) -> Reply:
        self._closed = True
        self.command_seen = command
        self._held, self._holding = b"", False
        return Reply(data, True)

    def _hold(self, line: bytes) -> bool:
        """Hold back *line*, the start of the current line, if it could still be the command."""
        if not line:  # the chunk ended with its newline: the next one starts a line
            self._held, self._holding, self._at_line_start = b"", False, True
            return True
        if line[0] not in _MAY_START_COMMAND or len(line) > _MAX_HELD_BYTES:
            return False
        text = codecs.utf_8_decode(line, _ERRORS, False)[0]  # a split last character waits
        if _classify(text) is _Line.TEXT:
            return False
        self._held, self._holding, self._at_line_start = line, bool(text), True
        return True

    def _upper(self, data: bytes) -> bytes:
        """Upper-case *data* (see :func:`tcp_upper.casing.upper`); the first bytes of a
        character split by the read wait for the rest of it."""
        if self._split:
            data = self._split + data
        whole = len(data) - incomplete_tail(data)
        self._split = data[whole:]
        return upper(data[:whole])


def _search_command_line(chunk: bytes, at_line_start: bool) -> int:
    """Where the first complete command line of *chunk* starts, or -1: the pure-Python
    ``find_command_line`` (the X pre-check, the gate, then the exact regular expression).

    The start of *chunk* starts a line only when *at_line_start*.
    """
    if (_X not in chunk and _UPPER_X not in chunk) or not _may_hold_command(chunk, at_line_start):
        return -1
    pattern = _COMMAND_LINE_AT_START if at_line_start else _COMMAND_LINE
    match = pattern.search(chunk.lower())
    if match is None:
        return -1
    return chunk.rfind(b"\n", 0, match.start()) + 1


def _may_hold_command(chunk: bytes, at_line_start: bool) -> bool:
    """False when *chunk* surely holds no complete command line (see _GATE_TABLE)."""
    folded = chunk.translate(_GATE_TABLE, _GATE_DELETE)
    return _GATE_LINE in folded or (at_line_start and folded.startswith(_GATE_LINE[1:]))


#: The search :meth:`UpperProtocol.feed` uses: the C one when tcp_upper.casing uses the
#: extension, else the regular expression. On a 64 KiB chunk with an X the C search is 2-10
#: times faster (one pass, no lower-cased copy; benchmarks/feed_micro.py). Tests swap it to run
#: both.
_find_command_line: Callable[[bytes, bool], int] = c_find_command_line or _search_command_line
