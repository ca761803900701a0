"""The run's report: a JSON-ready summary, the Spanish table, the live progress line, the plot."""

from __future__ import annotations

import math
from typing import Any

from .. import __version__
from ..system import format_address
from .histogram import LatencyHistogram
from .load import ERROR_KINDS, WorkerResult

PROG = "tcp-upper-bench"


def load_pyplot() -> Any:
    """matplotlib.pyplot, drawing to files only; ImportError when the extra is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(path: str, latency: LatencyHistogram, title: str) -> None:
    """Save a latency-by-percentile plot (log x axis, so the tail is visible) to *path*."""
    plt = load_pyplot()
    fractions, values = [], []
    steps = max(1, math.ceil(math.log10(max(latency.count, 10)) * 50))
    for step in range(steps + 1):
        fraction = 1 - 10 ** (-step / 50)
        if fraction > 1 - 1 / max(latency.count, 1):
            break
        fractions.append(fraction)
        values.append(latency.percentile(fraction) / 1000)
    fractions.append(1 - 1 / max(latency.count, 2))
    values.append(latency.max_us / 1000)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        ax.plot([1 / (1 - f) for f in fractions], values, drawstyle="steps-post")
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = [t for t in (1, 2, 10, 100, 1000, 10_000, 100_000, 1_000_000)
                 if t <= 1 / (1 - fractions[-1])]
        labels = {1: "0%", 2: "50%", 10: "90%", 100: "99%", 1000: "99.9%", 10_000: "99.99%",
                  100_000: "99.999%", 1_000_000: "99.9999%"}
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[t] for t in ticks])
        ax.set_xlabel("percentil")
        ax.set_ylabel("latencia (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.4)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _percentiles(histogram: LatencyHistogram, *fractions: float) -> dict[str, float]:
    figures = {f"p{fraction * 100:g}": round(histogram.percentile(fraction), 1)
               for fraction in fractions}
    figures["max"] = round(histogram.max_us, 1)
    return figures


def summarize(result: WorkerResult, *, host: str, port: int, depth: int, size: int,
              duration: float, processes: int, payload: str) -> dict[str, Any]:
    """The run as a JSON-ready dict (the ``--json`` output; the table is printed from it)."""
    elapsed = result.elapsed_s or 1e-9
    latency = result.latency
    return {
        "version": __version__,
        "host": host,
        "port": port,
        "conns": result.conns,
        "depth": depth,
        "size": size,
        "payload": payload,
        "duration_s": duration,
        "processes": processes,
        "connect_s": round(result.connect_s, 6),
        "elapsed_s": round(result.elapsed_s, 6),
        "requests": result.requests,
        "requests_per_s": round(result.requests / elapsed, 1),
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        "mb_per_s_sent": round(result.bytes_sent / elapsed / 1e6, 3),
        "mb_per_s_received": round(result.bytes_received / elapsed / 1e6, 3),
        "latency_us": {**_percentiles(latency, 0.50, 0.90, 0.99, 0.999),
                       "mean": round(latency.mean_us, 1)},
        "first_reply_us": _percentiles(result.first_reply, 0.50, 0.99),
        "errors": result.error_count,
        "errors_by_kind": {kind: result.errors[kind] for kind in ERROR_KINDS
                           if result.errors.get(kind)},
        "first_error": result.first_error,
        "ok": result.error_count == 0 and result.requests > 0,
    }


def _format_latency(micros: float) -> str:
    if micros < 1000:
        return f"{micros:.0f} µs"
    if micros < 1_000_000:
        return f"{micros / 1000:.2f} ms"
    return f"{micros / 1e6:.2f} s"


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable report, in Spanish."""
    latency = summary["latency_us"]
    first = summary["first_reply_us"]
    processes = summary["processes"]
    rows = [
        ("conexiones", f"{summary['conns']} ({processes} proceso{'s' if processes > 1 else ''})"),
        ("líneas por lote", str(summary["depth"])),
        ("bytes por línea", str(summary["size"])),
        ("carga", summary["payload"]),
        ("tiempo en conectar todas", f"{summary['connect_s']:.3f} s"),
        ("duración medida", f"{summary['elapsed_s']:.2f} s"),
        ("peticiones", str(summary["requests"])),
        ("peticiones/s", f"{summary['requests_per_s']:.0f}"),
        ("MB/s enviados / recibidos",
         f"{summary['mb_per_s_sent']:.2f} / {summary['mb_per_s_received']:.2f}"),
        ("latencia p50", _format_latency(latency["p50"])),
        ("latencia p90", _format_latency(latency["p90"])),
        ("latencia p99", _format_latency(latency["p99"])),
        ("latencia p99.9", _format_latency(latency["p99.9"])),
        ("latencia máxima", _format_latency(latency["max"])),
        ("primera respuesta p50 / p99 / máx.",
         " / ".join(_format_latency(first[key]) for key in ("p50", "p99", "max"))),
    ]
    errors = str(summary["errors"])
    if summary["errors_by_kind"]:
        errors += " (" + ", ".join(f"{ERROR_KINDS[kind]}: {times}"
                                   for kind, times in summary["errors_by_kind"].items()) + ")"
    rows.append(("errores", errors))
    if summary["first_error"]:
        rows.append(("primer error", summary["first_error"]))
    width = max(len(name) for name, _ in rows)
    target = format_address((summary["host"], summary["port"]))
    head = f"{PROG} {summary['version']} contra {target}"
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])


class ProgressLine:
    """The live line on stderr, rewritten in place; silent unless stderr is a terminal."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.width = 0

    def update(self, elapsed: float, requests: int, errors: int) -> None:
        if not self.enabled:
            return
        rate = requests / elapsed if elapsed > 0 else 0.0
        line = f"{elapsed:6.1f} s  {rate:10.0f} peticiones/s  {errors} errores"
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

