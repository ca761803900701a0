"""``tcp-upper-bench``: a closed-loop load generator for a tcp_upper server that is already running.

How it measures, and why:

- **Closed loop.** Each connection sends ``--depth`` lines back to back, waits until the replies
  to all of them have arrived, checks every byte, and only then sends the next batch. Throughput
  is what the server sustains for that many clients of that shape; latency is what they see.
- **Round trip of a line** = from sending its batch to the arrival of the last byte of its reply.
  The tail is reported too (p99.9, maximum), and per connection the **time to first reply**:
  from the start of its connect to the first byte of its first reply, which is what a client
  of a server swamped by new connections waits.
- **The tool must not be the bottleneck it measures.** Per process, one thread drives every
  connection with non-blocking sockets and :mod:`selectors`; payloads and their expected replies
  are built once per connection; a batch is checked with one ``bytes ==``; latencies go into a
  fixed-size log-linear histogram (no list growing with the run). ``--processes`` spreads the
  connections over several such processes and merges their results.
- **TCP has no message boundaries.** Bytes are accumulated until the whole batch has arrived;
  a read may hold part of a line or several lines.
- **Everything is bounded.** Each connect, batch and close has a deadline (``--timeout``), so a
  stuck server ends the run with an error instead of hanging it.
- **Closing.** After ``--duration`` each connection finishes its batch, then half-closes
  (``shutdown(SHUT_WR)``: end of stream, which the server answers by closing) and waits at most
  :data:`CLOSE_WAIT` seconds for that close. A byte arriving then was never asked for: an error.
  ``DESCONEXION`` is not sent; the end of stream is the cheaper orderly goodbye.

Payload: ``--payload`` picks a class of text (:mod:`.payloads`: ``ascii``, the default, is
``size - 1`` lowercase letters and spaces plus ``\\n``; others are Spanish prose, lines starting
like the command, non-ASCII text, bytes that are not UTF-8), or ``--payload-file`` takes the lines
of a file. The expected reply is what the project's own protocol answers, so every class is
checked byte for byte.

The package: :mod:`.payloads` (what is sent, what must come back), :mod:`.histogram`,
:mod:`.load` (one process's connections), :mod:`.processes` (several), :mod:`.report` and
:mod:`.cli`.
"""

from __future__ import annotations

from .cli import build_parser, main
from .histogram import LatencyHistogram
from .payloads import PAYLOADS, make_batch, make_line

__all__ = ["PAYLOADS", "LatencyHistogram", "build_parser", "main", "make_batch", "make_line"]
