"""What the load sends: classes of lines, built once per connection with their expected replies.

A batch is ``depth`` units sent back to back. A unit is whole lines (each ends with ``\\n``) of
exactly ``size`` bytes (the last line is cut to fit, unless it is the only one), so a batch never
leaves a line start held back by the server, every class moves the same bytes per batch as
``ascii`` (one 64 KiB batch is one server read, not a read and a remainder), and the expected
reply is what :class:`~tcp_upper.protocol.UpperProtocol` answers: the very rules the
server applies, Unicode upper case and non-UTF-8 pass-through included. Latency is recorded per
unit, when the last byte of its reply arrives.

The classes are chosen to be cheap or expensive for different parts of a server: ``ascii`` is
the classic benchmark line; ``d-lines`` and ``blank-start`` start every line the way the command
does; ``near-miss`` is the command plus two letters; ``word-in-line`` has the command's word,
whole, on every line, with other text beside it; ``spanish`` is prose with accents; the last two
are all non-ASCII or not UTF-8 at all.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from ..casing import incomplete_tail
from ..protocol import UpperProtocol

_FILLER = b"hola servidor "
_LETTERS = b"abcdefghijklmnopqrstuvwxyz"

#: Spanish prose written for this project (one sentence a line), with the accents, ñ, ¿ and ¡
#: that real text has and many lines starting with d/D, like the command.
SPANISH = (
    "de la casa a la playa hay un camino de tierra que baja entre los pinos.",
    "donde está él, allí está también su perro, que no se separa nunca de su lado.",
    "Después de la tormenta salió el sol y los niños corrieron a la orilla.",
    "¿Dónde dejaste las llaves del almacén? Las necesito antes de las ocho.",
    "¡Qué alegría verte otra vez por aquí, después de tantos años!",
    "Desde la ventana se ven las montañas, cubiertas de nieve en invierno.",
    "  decía mi abuela que el que madruga encuentra la panadería abierta.",
    "La reunión empezó tarde porque la conexión a internet se cortó dos veces.",
    "dime qué quieres cenar y bajo a comprarlo a la tienda de la esquina.",
    "El señor Núñez llegó en el último tren, con una maleta y un paraguas.",
    "Durante el verano la biblioteca abre sólo por las mañanas.",
    "\tdespués de comer, una siesta corta; después, a trabajar otra vez.",
    "Los pingüinos del zoológico comen pescado fresco tres veces al día.",
    "desconectó el teléfono para poder leer tranquilo el periódico del domingo.",
)

LineMaker = Callable[[int, int, int], bytes]  # (connection, line number, size) -> line


def _spell(number: int) -> bytes:
    """*number* in base 26 written with a-z, so payloads carry counters yet stay letters only."""
    out = bytearray()
    while True:
        number, digit = divmod(number, 26)
        out.append(_LETTERS[digit])
        if not number:
            return bytes(out)


def make_line(conn_id: int, line_no: int, size: int) -> bytes:
    """One ``ascii`` line of exactly *size* bytes (``\\n`` included), unique per connection/line.

    It starts with ``h`` and spells the connection and line number in letters, so it is never
    the command nor a line start the server would hold back, and a reply sent to the wrong
    connection is wrong bytes.
    """
    need = size - 1
    body = b"h" + _spell(conn_id) + b" " + _spell(line_no) + b" "
    if len(body) < need:
        body += _FILLER * (need // len(_FILLER) + 1)
    return body[:need] + b"\n"


def make_batch(conn_id: int, depth: int, size: int) -> bytes:
    """The *depth* ``ascii`` lines a connection sends back to back; the same every round."""
    return b"".join(make_line(conn_id, line_no, size) for line_no in range(depth))


def cycle_lines(lines: Sequence[bytes]) -> LineMaker:
    """Lines taken in turn; each connection starts at its own place in the cycle."""
    return lambda conn_id, line_no, size: lines[(conn_id + line_no) % len(lines)]


def _random_line(conn_id: int, line_no: int, size: int) -> bytes:
    """*size* - 1 random bytes (no newline, mostly not UTF-8), the same for the same arguments."""
    body = random.Random(conn_id * 1_000_003 + line_no).randbytes(max(size - 1, 1))
    return body.replace(b"\n", b"\xff") + b"\n"


_NON_ASCII = "ñáéíóúüçàè"

#: Every payload class by name (``--payload``); "ascii" is the default.
PAYLOADS: dict[str, LineMaker] = {
    "ascii": make_line,
    "spanish": cycle_lines([line.encode() + b"\n" for line in SPANISH]),
    "d-lines": cycle_lines([b"d\n"]),
    "blank-start": cycle_lines([b" x\n", b"\td\n", b"  dos\n"]),
    "non-ascii": cycle_lines([(_NON_ASCII[i:] + _NON_ASCII * 4)[:31].encode() + b"\n"
                         for i in range(len(_NON_ASCII))]),
    "near-miss": cycle_lines([b"DESCONEXIONES\n", b"desconexiones\n", b" Desconexiones\r\n"]),
    "word-in-line": cycle_lines([line.encode() + b"\n" for line in (
        "x desconexion", "DESCONEXION x", "la desconexión.", "  Desconexión total\r")]),
    "random-bytes": _random_line,
}


def file_lines(data: bytes) -> tuple[bytes, ...]:
    """The lines of a ``--payload-file`` (each ending with ``\\n``); ValueError when unusable."""
    lines = tuple(line if line.endswith(b"\n") else line + b"\n"
                  for line in data.splitlines(keepends=True))
    if not lines:
        raise ValueError("el fichero está vacío")
    check_no_command(b"".join(lines))
    return lines


def check_no_command(data: bytes) -> None:
    """ValueError when *data* holds a line the server would take as the disconnect command."""
    if UpperProtocol().feed(data).close:
        raise ValueError("contiene una línea que es la orden de desconexión (DESCONEXION)")


@dataclass(frozen=True)
class Batch:
    """One connection's batch, its expected reply, and where each unit's reply ends in it."""

    data: bytes
    expected: bytes
    ends: tuple[int, ...]  # cumulative reply length after each unit

    def units_done(self, before: int, got: int) -> int:
        """How many units' replies were completed by bytes *before*..*got* of the reply."""
        return bisect.bisect_right(self.ends, got) - bisect.bisect_right(self.ends, before)

    def unit_at(self, offset: int) -> int:
        """The unit whose reply holds byte *offset*."""
        return min(bisect.bisect_right(self.ends, offset), len(self.ends) - 1)


def _cut_to(unit: bytes, size: int) -> bytes:
    """*unit* cut to *size* bytes, still ending with a newline; a UTF-8 character the cut splits
    becomes spaces (so text classes stay text). A unit of one line stays whole."""
    if len(unit) <= size or unit.index(b"\n") == len(unit) - 1:
        return unit
    body = unit[:size - 1]
    split = incomplete_tail(body)
    return body[:len(body) - split] + b" " * split + b"\n"


def build_batch(maker: LineMaker, conn_id: int, depth: int, size: int) -> Batch:
    """*depth* units of whole lines from *maker*, *size* bytes each, and their replies."""
    protocol = UpperProtocol()
    data, expected, ends = [], [], []
    line_no = total = 0
    for _ in range(depth):
        unit = b""
        while len(unit) < size:
            unit += maker(conn_id, line_no, size)
            line_no += 1
        unit = _cut_to(unit, size)
        reply = protocol.feed(unit)
        if reply.close or protocol.holding:  # cannot happen for the classes above
            raise ValueError("la carga contiene la orden de desconexión")
        data.append(unit)
        expected.append(reply.data)
        total += len(reply.data)
        ends.append(total)
    return Batch(b"".join(data), b"".join(expected), tuple(ends))
