"""``tcp-upper-bench``: arguments, the checks made before connecting, the run, the report."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from .. import __version__, config
from ..cli_es import SpanishArgumentParser
from ..errors import SettingsError
from ..system import format_address, raise_open_file_limit
from .load import Target, error_text
from .payloads import PAYLOADS, file_lines
from .processes import PROG, run_load
from .report import ProgressLine, format_table, load_pyplot, summarize, write_plot

#: Memory for the prebuilt batches and expected replies, all processes together.
MAX_PAYLOAD_BYTES = 1 << 30
#: Longest --duration and --timeout: a week.
MAX_RUN_SECONDS = 7 * 24 * 3600


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A settings parser (``ValueError`` with a Spanish reason) as an argparse type."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}: {text!r}") from None

    return convert


def _seconds(text: str) -> float:
    value = config.parse_seconds(text, zero_is_off=False)
    if value is None or value > MAX_RUN_SECONDS:
        raise ValueError(f"debe ser un número de segundos mayor que 0 y como mucho "
                         f"{MAX_RUN_SECONDS}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``tcp-upper-bench`` argument parser (host and port come from the shared settings)."""
    parser = SpanishArgumentParser(
        prog=PROG,
        description="Mide un servidor tcp_upper que ya está en marcha: N conexiones envían lotes "
        "de líneas, esperan todas las respuestas, comprueban cada byte y repiten (bucle cerrado).",
        epilog="Latencia de una línea: desde el envío de su lote hasta el último byte de su "
        "respuesta. Al acabar, cada conexión termina su lote y cierra su lado de escritura. "
        "Salida: 0 todo correcto, 1 algún error, 2 argumentos no válidos.",
    )
    config.add_arguments(parser, ("host",))
    # Our own --port (validated by the shared settings all the same): the shared help offers
    # port 0, "any free port", which only makes sense for listening.
    parser.add_argument("--port", metavar="PUERTO", default=None,
                        help=f"puerto TCP del servidor (por defecto: {config.Settings().port})")
    count = _checked(config.parse_int(1, 100_000))
    parser.add_argument("--conns", type=count, default=10, metavar="N",
                        help="conexiones simultáneas (por defecto: %(default)s)")
    parser.add_argument("--depth", type=count, default=1, metavar="N",
                        help="líneas que cada conexión envía seguidas antes de esperar sus "
                        "respuestas (por defecto: %(default)s)")
    parser.add_argument("--size", type=_checked(config.parse_int(2, 64 * 1024 * 1024)),
                        default=14, metavar="N",
                        help="bytes por línea, salto de línea incluido; con otra carga que "
                        "ascii, bytes mínimos de cada grupo de líneas (por defecto: %(default)s)")
    payload = parser.add_mutually_exclusive_group()
    payload.add_argument("--payload", choices=list(PAYLOADS), default="ascii",
                         help="clase de texto que se envía (por defecto: %(default)s)")
    payload.add_argument("--payload-file", metavar="RUTA",
                         help="envía las líneas de este fichero, por turno")
    parser.add_argument("--duration", type=_checked(_seconds), default=3.0, metavar="SEGUNDOS",
                        help="duración de la carga (por defecto: %(default)s)")
    parser.add_argument("--processes", type=_checked(config.parse_int(1, 256)), default=1,
                        metavar="N", help="procesos que generan la carga, para que la "
                        "herramienta no sea el cuello de botella (por defecto: %(default)s)")
    parser.add_argument("--timeout", type=_checked(_seconds), default=10.0, metavar="SEGUNDOS",
                        help="espera máxima de cada conexión, lote y cierre (por defecto: "
                        "%(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="resultado en JSON por la salida estándar (y nada más)")
    parser.add_argument("--plot", metavar="FICHERO.png",
                        help="dibuja la latencia por percentil (necesita matplotlib: "
                        "pip install 'tcp_upper[plot]')")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="muestra la versión del programa y termina")
    return parser


class _Refused(Exception):
    """A reason not to run, for the user: one line and an exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _payload_lines(args: argparse.Namespace) -> tuple[bytes, ...] | None:
    if args.payload_file is None:
        return None
    try:
        return file_lines(Path(args.payload_file).read_bytes())
    except OSError as exc:
        raise _Refused(2, f"--payload-file: no se puede leer {args.payload_file!r}: "
                       f"{error_text(exc)}") from None
    except ValueError as exc:
        raise _Refused(2, f"--payload-file {args.payload_file!r}: {exc}") from None


def _check_plot(path: str | None) -> None:
    if path is None:
        return
    try:
        load_pyplot()
    except ImportError:
        raise _Refused(2, "--plot necesita matplotlib, que no está instalado: "
                       "pip install 'tcp_upper[plot]'") from None
    if not Path(path).resolve().parent.is_dir():
        raise _Refused(2, f"--plot: no existe el directorio de {path!r}")


def _target(args: argparse.Namespace) -> tuple[Target, config.Settings]:
    """Validate everything that can be checked before connecting; the plan of the run."""
    try:
        settings = config.load_settings(args, ("host", "port"))
    except SettingsError as exc:
        raise _Refused(2, str(exc)) from None
    if settings.port == 0:
        raise _Refused(2, "el puerto 0 no sirve para conectar: indique con --port el del "
                       "servidor")
    payload_bytes = 2 * args.conns * args.depth * args.size
    if payload_bytes > MAX_PAYLOAD_BYTES:
        raise _Refused(2, f"--conns * --depth * --size necesitaría {payload_bytes // 2**20} MiB "
                       f"de memoria (máximo {MAX_PAYLOAD_BYTES // 2**20}); reduzca alguno")
    lines = _payload_lines(args)
    _check_plot(args.plot)
    label = format_address((settings.host, settings.port))
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise _Refused(1, f"no se puede resolver {settings.host!r} (para {label}): "
                       f"{reason}") from None
    return Target(label=label, conns=args.conns, family=family, sockaddr=sockaddr,
                  depth=args.depth, size=args.size, duration=args.duration,
                  timeout=args.timeout, payload=args.payload, payload_lines=lines), settings


def _run(args: argparse.Namespace, target: Target, settings: config.Settings) -> int:
    """Run the load and print the report; the exit status."""
    processes = min(args.processes, args.conns)
    raise_open_file_limit(-(-args.conns // processes) + 64)
    progress = ProgressLine(sys.stderr)
    try:
        result, failure = run_load(target, args.conns, processes, progress.update)
    finally:
        progress.clear()
    if result is None:
        raise _Refused(1, failure or "la prueba no pudo completarse")
    summary = summarize(result, host=settings.host, port=settings.port, depth=args.depth,
                        size=args.size, duration=args.duration, processes=processes,
                        payload=f"fichero {args.payload_file}" if args.payload_file
                        else args.payload)
    print(json.dumps(summary, ensure_ascii=False, indent=2) if args.json
          else format_table(summary))
    if args.plot is not None:
        title = (f"{target.label}: {summary['conns']} conexiones, líneas por lote: "
                 f"{args.depth}, bytes por línea: {args.size}")
        try:
            write_plot(args.plot, result.latency, title)
        except OSError as exc:
            raise _Refused(1, f"no se puede escribir {args.plot!r}: {error_text(exc)}") from None
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """``tcp-upper-bench``: 0 when every reply was right, 1 on any error, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, *_target(args))
    except _Refused as refused:
        print(f"{parser.prog}: error: {refused}", file=sys.stderr)
        return refused.status
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrumpido", file=sys.stderr)
        return 130
