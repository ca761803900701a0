"""The two programs' entry points: ``tcp-upper-server`` and ``tcp-upper-client``.

Only the process wiring (this module, :mod:`.serving`, :mod:`.logs`, :mod:`.workers`) touches
``sys.argv``, the environment, logging configuration and signal handlers; the library
(``protocol``, ``server``, ``client``, ``config``) stays importable without side effects.
Each entry point imports only its own side, so starting the client never loads the server.
"""

from __future__ import annotations

import argparse
import logging
import ssl

from . import __version__, config
from .cli_es import SpanishArgumentParser
from .errors import SettingsError
from .logs import background_logging, configure_logging, exit_status


def build_parser(prog: str, description: str, names: tuple[str, ...]) -> argparse.ArgumentParser:
    """An argument parser in Spanish with ``--version``, ``--env-file`` and a flag per setting."""
    parser = SpanishArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="muestra la versión del programa y termina")
    config.add_arguments(parser, names)
    return parser


def parse_settings(
    parser: argparse.ArgumentParser, names: tuple[str, ...], argv: list[str] | None
) -> config.Settings:
    """Parse *argv* and resolve settings; a bad one exits 2 with one line (argparse style)."""
    return _load_settings(parser, parser.parse_args(argv), names)


def _load_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]
) -> config.Settings:
    """Resolve settings from parsed *args*; the client also reads its MENSAJE from them."""
    try:
        return config.load_settings(args, names)
    except SettingsError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
        raise  # unreachable: parser.exit raises SystemExit


def server_main(argv: list[str] | None = None) -> int:
    """``python -m tcp_upper.server``: returns the exit status (0 stopped, 1 cannot listen)."""
    from . import serving
    from .server.stop import LOG_DONE

    parser = build_parser(
        "tcp-upper-server",
        "Servidor TCP que responde cada mensaje en mayúsculas; DESCONEXION cierra ese cliente.",
        config.SERVER_SETTINGS,
    )
    # Internal (tcp_upper.cluster): an inherited pipe that gets the bound port once listening.
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = _load_settings(parser, args, config.SERVER_SETTINGS)
    on_ready = serving.ready_reporter(args.ready_fd)
    serving.block_stop_signals()  # before any thread starts: every thread inherits the mask
    limit_warning = serving.raise_file_limit(settings.max_clients)
    serving.tune_runtime()
    if settings.workers > 1:
        from .workers import run_workers

        return run_workers(settings, limit_warning, on_ready)
    with background_logging(settings.log_level, exit_seconds=LOG_DONE) as log_writer:
        if limit_warning:
            logging.getLogger("tcp_upper").warning("%s", limit_warning)
        status = serving.run_server(settings, log_writer, on_ready)
    return exit_status(status, log_writer)


def client_main(argv: list[str] | None = None) -> int:
    """``tcp-upper-client``: see ``tcp_upper.client.session.run_session``."""
    from .client.session import run_session

    parser = build_parser(
        "tcp-upper-client",
        "Cliente del servidor de mayúsculas: envía cada línea que escriba y muestra la "
        "respuesta; DESCONEXION (o Ctrl-D) termina. Con un MENSAJE, envía solo ese, muestra "
        "solo la respuesta y termina.",
        config.CLIENT_SETTINGS,
    )
    parser.add_argument("words", nargs="*", metavar="MENSAJE",
                        help="mensaje que enviar (las palabras se unen con un espacio)")
    args = parser.parse_args(argv)
    settings = _load_settings(parser, args, config.CLIENT_SETTINGS)
    message = " ".join(args.words) if args.words else None
    if message is not None and "\n" in message:
        parser.exit(2, f"{parser.prog}: error: el MENSAJE debe ser una sola línea\n")
    context = _client_ssl_context(parser, settings) if settings.use_tls else None
    configure_logging(settings.log_level)
    return run_session(settings.host, settings.port, settings.timeout, prog=parser.prog,
                       message=message, ssl_context=context)


def _client_ssl_context(parser: argparse.ArgumentParser, settings: config.Settings,
                        ) -> ssl.SSLContext:
    """The client's TLS context; a --cafile that cannot be loaded exits 2 with one line."""
    from .client import client_ssl_context

    try:
        return client_ssl_context(settings.cafile, settings.tls_insecure)
    except OSError as exc:  # ssl.SSLError too: the file is not PEM
        reason = ("no existe" if isinstance(exc, FileNotFoundError) else
                  "es una carpeta" if isinstance(exc, IsADirectoryError) else
                  "no tiene certificados en formato PEM" if isinstance(exc, ssl.SSLError) else
                  (exc.strerror or str(exc)).lower())
        parser.exit(2, f"{parser.prog}: error: no se puede cargar la CA de --cafile "
                       f"{settings.cafile!r}: {reason}\n")
        raise  # unreachable: parser.exit raises SystemExit
