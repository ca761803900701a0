"""One settings object for the server and the client.

Each setting is resolved once, highest first: command-line flag, environment variable, env file,
built-in default. The env file is ``config.env`` in the current directory when it exists, or the
file named by ``--env-file`` (which must exist). It is read with ``dotenv.dotenv_values``, which
returns a dict and never writes into ``os.environ``. An empty value counts as not set.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dotenv import dotenv_values

from .errors import SettingsError

DEFAULT_ENV_FILE = "config.env"
ENV_PREFIX = "TCP_UPPER_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    """Everything the programs can be told; built once by :func:`load_settings`."""

    host: str = "localhost"
    port: int = 5000
    #: Concurrent clients served; one more gets an ``ERROR`` line. High enough for the
    #: 10,000-connection benchmark, low enough to stay within a usual open-file hard limit.
    max_clients: int = 10_000
    #: Seconds a client may stay silent before it is closed; ``None`` (or 0) is off: a person
    #: at the client may think for minutes.
    idle_timeout: float | None = None
    #: Seconds the server may be unable to send to a client before it closes it.
    write_timeout: float = 30.0
    log_level: str = "INFO"
    #: Client only: seconds to wait for a reply or for the server's close.
    timeout: float = 10.0
    #: Server only: processes sharing the port (SO_REUSEPORT).
    workers: int = 1


def _parse_host(text: str) -> str:
    if not text.strip() or any(ch.isspace() for ch in text):
        raise ValueError("debe ser un nombre o una dirección sin espacios")
    return text


def parse_int(low: int, high: int) -> Callable[[str], int]:
    """A parser of whole numbers in [*low*, *high*]; ValueError with the reason in Spanish."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"debe ser un número entero entre {low} y {high}") from None
        if not low <= value <= high:
            raise ValueError(f"debe ser un número entero entre {low} y {high}")
        return value

    return parse


#: Longest timeout accepted (about 115 days): beyond it, socket timeouts overflow.
MAX_SECONDS = 10_000_000


def parse_seconds(text: str, *, zero_is_off: bool) -> float | None:
    """Seconds, positive and at most MAX_SECONDS (0 is None when *zero_is_off*); ValueError."""
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if zero_is_off and value == 0:
        return None
    if not 0 < value <= MAX_SECONDS:  # also refuses nan and inf
        hint = "0 (desactivado) o un número de segundos" if zero_is_off else "un número de segundos"
        raise ValueError(f"debe ser {hint} mayor que 0 y como mucho {MAX_SECONDS}")
    return value


def _parse_log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError("debe ser uno de " + ", ".join(LOG_LEVELS))
    return level


_PARSERS: dict[str, Callable[[str], Any]] = {
    "host": _parse_host,
    "port": parse_int(0, 65535),
    "max_clients": parse_int(1, 1_000_000),
    "idle_timeout": lambda text: parse_seconds(text, zero_is_off=True),
    "write_timeout": lambda text: parse_seconds(text, zero_is_off=False),
    "log_level": _parse_log_level,
    "timeout": lambda text: parse_seconds(text, zero_is_off=False),
    "workers": parse_int(1, 256),
}

_HELP = {
    "host": "dirección donde escuchar o a la que conectar (por defecto: %(default)s)",
    "port": "puerto TCP; 0 = cualquiera libre (por defecto: %(default)s)",
    "max_clients": "clientes simultáneos como máximo (por defecto: %(default)s)",
    "idle_timeout": "segundos de silencio antes de cerrar a un cliente; 0 = nunca (por defecto)",
    "write_timeout": "segundos sin poder enviar a un cliente antes de cerrarlo "
    "(por defecto: %(default)s)",
    "log_level": "nivel de registro: " + ", ".join(LOG_LEVELS) + " (por defecto: %(default)s)",
    "timeout": "segundos de espera de cada respuesta (por defecto: %(default)s)",
    "workers": "procesos que comparten el puerto (por defecto: %(default)s)",
}

SERVER_SETTINGS = ("host", "port", "max_clients", "idle_timeout", "write_timeout", "log_level",
                   "workers")
CLIENT_SETTINGS = ("host", "port", "timeout", "log_level")


def flag_for(name: str) -> str:
    """The command-line flag of a setting: ``max_clients`` -> ``--max-clients``."""
    return "--" + name.replace("_", "-")


def variable_for(name: str) -> str:
    """The environment variable of a setting: ``max_clients`` -> ``TCP_UPPER_MAX_CLIENTS``."""
    return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add ``--env-file`` and one flag per named setting to *parser*.

    Flags are kept as text (default ``None`` = not given) so that every source is validated by
    the same rules and a bad value is reported the same way wherever it came from.
    """
    defaults = Settings()
    parser.add_argument(
        "--env-file",
        metavar="RUTA",
        help=f"fichero de ajustes (por defecto: {DEFAULT_ENV_FILE} en el directorio actual, "
        "si existe)",
    )
    for name in names:
        default = getattr(defaults, name)
        parser.add_argument(
            flag_for(name),
            dest=name,
            metavar=name.upper(),
            default=None,
            help=_HELP[name] % {"default": "desactivado" if default is None else default},
        )


def read_env_file(path: str | None, cwd: Path | None = None) -> tuple[dict[str, str], str]:
    """Return the env file's non-empty values and a label for messages.

    With no *path*, ``config.env`` in *cwd* is read if it exists. A named *path* that does not
    exist is a :class:`SettingsError`.
    """
    base = cwd if cwd is not None else Path.cwd()
    if path is None:
        candidate = base / DEFAULT_ENV_FILE
        if not candidate.is_file():
            return {}, DEFAULT_ENV_FILE
        label = DEFAULT_ENV_FILE
    else:
        candidate = base / path
        label = path
        if not candidate.is_file():
            raise SettingsError(f"--env-file: no existe el fichero de ajustes {path!r}")
    try:
        raw = dotenv_values(candidate, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"no se puede leer el fichero de ajustes {label!r}: {exc}") from None
    return {key: value for key, value in raw.items() if value}, label


def load_settings(
    args: argparse.Namespace,
    names: Iterable[str],
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve the named settings (flag > environment > env file > default) and validate them.

    Raises :class:`SettingsError` with one line naming the setting, the value and its source.
    """
    environ = os.environ if environ is None else environ
    file_values, file_label = read_env_file(getattr(args, "env_file", None), cwd)
    resolved: dict[str, Any] = {}
    for name in names:
        variable = variable_for(name)
        flag_value = getattr(args, name, None)
        if flag_value is not None:
            text, where = flag_value, f"{flag_for(name)} en la línea de órdenes"
        elif environ.get(variable):
            text, where = environ[variable], f"{variable} en el entorno"
        elif file_values.get(variable):
            text, where = file_values[variable], f"{variable} en {file_label}"
        else:
            continue
        try:
            resolved[name] = _PARSERS[name](text)
        except ValueError as exc:
            raise SettingsError(f"valor no válido {text!r} para {where}: {exc}") from None
    return Settings(**resolved)


__all__ = [
    "CLIENT_SETTINGS",
    "SERVER_SETTINGS",
    "Settings",
    "add_arguments",
    "flag_for",
    "load_settings",
    "variable_for",
]
