"""The per-line stream processor of tcp_upper 7ce82b2, kept as the oracle of the fast path.

It scans with a Python loop line by line and asks ``_classify`` (NFC, case folding) about every
line that starts with a blank or a D: slow, but its reading of the contract is the one the
tests have checked since the protocol was written. ``tests/test_protocol.py`` feeds it and
:class:`tcp_upper.protocol.UpperProtocol` the same chunks and wants the same replies, close
decisions and held-back state after every call.
"""

from __future__ import annotations

import codecs
import re

from tcp_upper.protocol import MAX_BLANKS, Reply, _classify, _Line

# A newline after which the next line could be the command: only D/d case-fold to "d".
_SUSPECT_LINE_START = re.compile(rf"\n(?=[ \t]{{0,{MAX_BLANKS}}}(?:[dD]|\Z))")
_ERRORS = "surrogateescape"


def _encode(text: str) -> bytes:
    return text.upper().encode("utf-8", _ERRORS)


class ReferenceProtocol:
    """Same interface as UpperProtocol (feed, settle, feed_eof, holding, closed, command_seen)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(_ERRORS)
        self._line_start: str | None = ""  # undecided line start; None inside a text line
        self._closed = False
        self.command_seen = False

    @property
    def holding(self) -> bool:
        return bool(self._line_start)

    @property
    def closed(self) -> bool:
        return self._closed

    def feed(self, data: bytes) -> Reply:
        if self._closed or not data:
            return Reply(b"", self._closed)
        return self._process(self._decoder.decode(data))

    def settle(self) -> Reply:
        if self._closed or not self._line_start:
            return Reply(b"", self._closed)
        held, self._line_start = self._line_start, None
        if _classify(held) is _Line.COMMAND:
            return self._close(b"", command=True)
        return Reply(_encode(held), False)

    def feed_eof(self) -> Reply:
        if self._closed:
            return Reply(b"", True)
        reply = self._process(self._decoder.decode(b"", True))
        if reply.close:
            return reply
        tail = self.settle()
        return self._close(reply.data + tail.data, command=tail.close)

    def _close(self, data: bytes, *, command: bool) -> Reply:
        self._closed = True
        self.command_seen = command
        self._line_start = None
        return Reply(data, True)

    def _process(self, text: str) -> Reply:
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
