"""One settings object for the server and the client.

Each setting is resolved once, highest first: command-line flag, environment variable, env file,
built-in default. The env file is ``config.env`` in the current directory when it exists, or the
file named by ``--env-file`` (which must exist). It is read with ``dotenv.dotenv_values``, which
returns a dict and never writes into ``os.environ``. An empty value counts as not set.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dotenv import dotenv_values

from .errors import SettingsError
from .proxy_protocol import DEFAULT_TRUSTED_PROXIES, Network, parse_networks

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
    #: Client only: TLS, trusting *cafile* (PEM) instead of the system's CAs, or trusting
    #: anything with *tls_insecure*; either of those two implies TLS.
    tls: bool = False
    cafile: str | None = None
    tls_insecure: bool = False

    @property
    def use_tls(self) -> bool:
        """Whether the client speaks TLS: ``--tls``, ``--cafile`` or ``--tls-insecure``."""
        return self.tls or self.cafile is not None or self.tls_insecure
    #: Server only: every connection starts with a PROXY protocol header (behind HAProxy)...
    proxy_protocol: bool = False
    #: ...sent by a peer in one of these networks; anyone else is refused.
    trusted_proxies: tuple[Network, ...] = DEFAULT_TRUSTED_PROXIES


def _parse_host(text: str) -> str:
    if not text.strip() or any(ch.isspace() for ch in text):
        raise ValueError("debe ser un nombre o una dirección sin espacios")
    return text


#: Integers as people write them in a setting: ASCII digits only. int() also takes "5_000",
#: "+5000" and other scripts' digits (Arabic-Indic ones), which a typo or a paste should not
#: turn into a number.
_INTEGER = re.compile(r"[0-9]+")
#: Seconds: ASCII decimal, optionally with an exponent ("1.5", "2e3"); no sign, nan or inf.
_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_int(low: int, high: int) -> Callable[[str], int]:
    """A parser of whole numbers from *low* to *high*; surrounding blanks are ignored."""

    def parse(text: str) -> int:
        digits = text.strip()
        if not _INTEGER.fullmatch(digits) or not low <= int(digits) <= high:
            raise ValueError(f"debe ser un número entero entre {low} y {high}")
        return int(digits)

    return parse


#: Longest timeout accepted (about 115 days): beyond it, socket timeouts overflow.
MAX_SECONDS = 10_000_000


def parse_seconds(text: str, *, zero_is_off: bool) -> float | None:
    """Seconds greater than 0 and at most :data:`MAX_SECONDS`; with *zero_is_off*, ``0`` gives
    ``None`` (off)."""
    number = text.strip()
    value = float(number) if _SECONDS.fullmatch(number) else math.nan
    if zero_is_off and value == 0:
        return None
    if not 0 < value <= MAX_SECONDS:  # also refuses nan
        hint = "0 (desactivado) o un número de segundos" if zero_is_off else "un número de segundos"
        raise ValueError(f"debe ser {hint} mayor que 0 y como mucho {MAX_SECONDS}")
    return value


_TRUE = {"1", "sí", "si", "s", "true", "yes", "y", "on"}
_FALSE = {"0", "no", "n", "false", "off"}


def parse_bool(text: str) -> bool:
    """Yes or no, as a person or a script writes it: 1/0, sí/no, true/false, yes/no, on/off."""
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError("debe ser sí o no (también 1/0, true/false, on/off)")


def _parse_path(text: str) -> str:
    if not text.strip():
        raise ValueError("debe ser la ruta de un fichero")
    return text


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
    "tls": parse_bool,
    "cafile": _parse_path,
    "tls_insecure": parse_bool,
    "proxy_protocol": parse_bool,
    "trusted_proxies": lambda text: parse_networks(text.split(",")),
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
    "tls": "conectar cifrando con TLS (variable: 1/0, sí/no, true/false)",
    "cafile": "fichero PEM con la autoridad (CA) en la que confiar, en vez de las del sistema; "
    "implica --tls",
    "tls_insecure": "TLS sin comprobar el certificado del servidor (solo para pruebas); "
    "implica --tls",
    "proxy_protocol": "exige una cabecera PROXY (v1 o v2) al principio de cada conexión, "
    "detrás de HAProxy (por defecto: no)",
    "trusted_proxies": "redes CIDR separadas por comas que pueden enviar la cabecera PROXY "
    "(por defecto: 127.0.0.0/8,::1/128)",
}

SERVER_SETTINGS = ("host", "port", "max_clients", "idle_timeout", "write_timeout", "log_level",
                   "workers", "proxy_protocol", "trusted_proxies")
CLIENT_SETTINGS = ("host", "port", "timeout", "log_level", "tls", "cafile", "tls_insecure")

#: What each flag's value is, in --help.
_METAVARS = {"host": "NOMBRE", "port": "PUERTO", "max_clients": "N", "workers": "N",
             "log_level": "NIVEL", "cafile": "FICHERO",
             "trusted_proxies": "CIDR[,CIDR…]"}

#: Settings that are yes/no flags on the command line (``--tls``), values elsewhere.
SWITCHES = frozenset({"tls", "tls_insecure", "proxy_protocol"})

#: What differs for each program: each help says what that program does with the setting, and
#: the client cannot connect to port 0. Other callers (bench, cluster) get the shared texts.
_PROGRAM_HELP: dict[tuple[str, ...], dict[str, str]] = {
    SERVER_SETTINGS: {
        "host": "dirección donde escuchar (por defecto: %(default)s)",
        "port": "puerto TCP donde escuchar; 0 = cualquiera libre (por defecto: %(default)s)",
    },
    CLIENT_SETTINGS: {
        "host": "nombre o dirección del servidor (por defecto: %(default)s)",
        "port": "puerto TCP del servidor (por defecto: %(default)s)",
    },
}
_PROGRAM_PARSERS: dict[tuple[str, ...], dict[str, Callable[[str], Any]]] = {
    CLIENT_SETTINGS: {"port": parse_int(1, 65535)},
}


def flag_for(name: str) -> str:
    """The command-line flag of a setting: ``max_clients`` -> ``--max-clients``."""
    return "--" + name.replace("_", "-")


def variable_for(name: str) -> str:
    """The environment variable of a setting: ``max_clients`` -> ``TCP_UPPER_MAX_CLIENTS``."""
    return ENV_PREFIX + name.upper()


def _program_rules(names: Iterable[str]) -> tuple[dict[str, str], dict[str, Callable[[str], Any]]]:
    """The help texts and parsers for *names*: the server's or the client's, or shared ones."""
    key = tuple(names)
    return {**_HELP, **_PROGRAM_HELP.get(key, {})}, {**_PARSERS, **_PROGRAM_PARSERS.get(key, {})}


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add ``--env-file`` and one flag per named setting to *parser*.

    Flags are kept as text (default ``None`` = not given) so that every source is validated by
    the same rules and a bad value is reported the same way wherever it came from. A switch
    (``--tls``) given on the command line is the text ``"1"``.
    """
    defaults = Settings()
    helps, _ = _program_rules(names)
    parser.add_argument(
        "--env-file",
        metavar="RUTA",
        help=f"fichero de ajustes (por defecto: {DEFAULT_ENV_FILE} en el directorio actual, "
        "si existe)",
    )
    for name in names:
        default = getattr(defaults, name)
        shown = "desactivado" if default is None else f"{default:g}" if isinstance(
            default, float) else default
        text = helps[name] % {"default": shown}
        if name in SWITCHES:
            parser.add_argument(flag_for(name), dest=name, action="store_const", const="1",
                                default=None, help=text)
        else:
            parser.add_argument(flag_for(name), dest=name, default=None, help=text,
                                metavar=_METAVARS.get(name, "SEGUNDOS"))


#: OS errors a settings file may give, in words for the one-line message.
_READ_ERRORS = {IsADirectoryError: "es una carpeta", PermissionError: "permiso denegado"}


def read_env_file(path: str | None, cwd: Path | None = None) -> tuple[dict[str, str], str]:
    """Return the env file's non-empty values and a label for messages.

    With no *path*, ``config.env`` in *cwd* is read if it exists. A named *path* may be any
    readable file (a pipe or ``/dev/fd/N`` too, read once); one that does not exist, or cannot
    be read, is a :class:`SettingsError`.
    """
    label = DEFAULT_ENV_FILE if path is None else path
    candidate = (cwd if cwd is not None else Path.cwd()) / label
    try:
        with open(candidate, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        if path is None:
            return {}, label
        raise SettingsError(f"--env-file: no existe el fichero de ajustes {path!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = ("no está en UTF-8" if isinstance(exc, UnicodeDecodeError) else
                  _READ_ERRORS.get(type(exc), (exc.strerror or str(exc)).lower()))
        raise SettingsError(f"no se puede leer el fichero de ajustes {label!r}: {reason}") from None
    raw = dotenv_values(stream=io.StringIO(text))
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
    _, parsers = _program_rules(names)
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
            resolved[name] = parsers[name](text)
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
    "parse_bool",
    "parse_int",
    "parse_seconds",
    "read_env_file",
    "variable_for",
]
