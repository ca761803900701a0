"""The tcp_upper wire protocol as pure logic: bytes in, bytes out, no I/O.

A :class:`UpperProtocol` is fed whatever a socket read returned and answers with the bytes to send
back and whether the client asked to leave. It knows nothing of sockets, threads, clocks or
logging, so every rule here can be tested by feeding it bytes in any chunking.

Rules (the contract is SPEC.md section 1):

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
from typing import NamedTuple

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

# A newline after which the next line could be the command: only D/d case-fold to "d", and NFC
# cannot turn any other first character into one. A cheap superset filter; _classify decides.
_SUSPECT_LINE_START = re.compile(rf"\n(?=[ \t]{{0,{MAX_BLANKS}}}(?:[dD]|\Z))")

# A coarser filter for the ASCII fast path, on bytes: a newline followed by a blank or a D.
# (No lookahead, so it scans about twice as fast; a chunk that ends with a newline is checked
# with endswith.) What it lets through, _process decides exactly.
_MAYBE_COMMAND_LINE_BYTES = re.compile(rb"\n[ \tdD]")
# Bytes that may begin the command's line: a blank or the command's first letter.
_MAY_START_COMMAND = frozenset(b" \tdD")

# Invalid UTF-8 bytes become lone surrogates on decode and the same bytes again on encode;
# str.upper() leaves surrogates alone, so non-UTF-8 input passes through byte for byte.
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
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(_ERRORS)
        # The undecided start of the current line, or None when the current line is already
        # known to be ordinary text (then nothing is held back until the next newline).
        self._line_start: str | None = ""
        self._closed = False
        #: Whether the connection ended by the disconnect command (rather than end of stream).
        self.command_seen = False
        self._decoder_empty = True  # no partial UTF-8 character buffered in the decoder

    @property
    def holding(self) -> bool:
        """True when bytes are held back waiting to learn whether they are the command."""
        return bool(self._line_start)

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
        if self._decoder_empty and not self._line_start and data.isascii():
            return self._process_ascii(data)
        reply = self._process(self._decoder.decode(data))
        self._decoder_empty = not self._decoder.getstate()[0]
        return reply

    def settle(self) -> Reply:
        """Decide the held-back line start after a quiet pause.

        A bare command closes the connection; anything else is sent, and the rest of that line
        is ordinary text.
        """
        if self._closed or not self._line_start:
            return Reply(b"", self._closed)
        held, self._line_start = self._line_start, None
        if _classify(held) is _Line.COMMAND:
            return self._close(b"", command=True)
        return Reply(_encode(held), False)

    def feed_eof(self) -> Reply:
        """The client ended its stream: return the last bytes to send; ``close`` is always set."""
        if self._closed:
            return Reply(b"", True)
        reply = self._process(self._decoder.decode(b"", True))
        if reply.close:
            return reply
        # A held-back start that is the bare command is not echoed; anything else is sent.
        tail = self.settle()
        return self._close(reply.data + tail.data, command=tail.close)

    def _close(self, data: bytes, *, command: bool) -> Reply:
        self._closed = True
        self.command_seen = command
        self._line_start = None
        return Reply(data, True)

    def _process_ascii(self, data: bytes) -> Reply:
        """The common case, on bytes: ASCII (upper-cased by ``bytes.upper``), nothing held back.

        It hands over to :meth:`_process` from the first line start that could be the command,
        so both paths give the same bytes.
        """
        if self._line_start == "" and data[0] in _MAY_START_COMMAND:
            return self._process(data.decode("ascii"))
        match = _MAYBE_COMMAND_LINE_BYTES.search(data)
        if match is None:
            # No line here can be the command; if the chunk ends with a newline, the next
            # chunk starts a line afresh, otherwise the current line goes on.
            self._line_start = "" if data.endswith(b"\n") else None
            return Reply(data.upper(), False)
        decided = match.start() + 1
        self._line_start = ""
        rest = self._process(data[decided:].decode("ascii"))
        return Reply(data[:decided].upper() + rest.data, rest.close)

    def _process(self, text: str) -> Reply:
        """Upper-case *text*, holding back or acting on a line start that may be the command."""
        if self._line_start is not None:
            text = self._line_start + text
            candidate: int | None = 0
        else:
            candidate = None
        position = 0  # everything before it is decided
        while True:
            if candidate is None:
                match = _SUSPECT_LINE_START.search(text, position)
                if match is None:
                    self._line_start = None
                    return Reply(_encode(text), False)
                candidate = match.end()
            newline = text.find("\n", candidate)
            if newline < 0:
                line = text[candidate:]
                if _classify(line) is _Line.TEXT:
                    self._line_start = None
                    return Reply(_encode(text), False)
                self._line_start = line
                return Reply(_encode(text[:candidate]), False)
            if _classify(text[candidate:newline]) is _Line.COMMAND:
                return self._close(_encode(text[:candidate]), command=True)
            position, candidate = newline, None


def _encode(text: str) -> bytes:
    return text.upper().encode("utf-8", _ERRORS)
