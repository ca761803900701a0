"""Write one payload class as a batch file and its expected reply, for loadgen.

usage: python benchmarks/payload_files.py NAME DEPTH SIZE OUTDIR  ->  OUTDIR/NAME.req, NAME.rsp
(NAME from ``tcp-upper-bench --payload``; the reply is what tcp_upper's protocol answers).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tcp_upper.bench.payloads import PAYLOADS, build_batch


def main(argv: list[str]) -> int:
    name, depth, size, outdir = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    batch = build_batch(PAYLOADS[name], 0, depth, size)
    (outdir / f"{name}.req").write_bytes(batch.data)
    (outdir / f"{name}.rsp").write_bytes(batch.expected)
    print(len(batch.ends))  # lines per batch, loadgen's DEPTH
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
