"""An ``argparse.ArgumentParser`` that speaks Spanish: usage, section titles, help and errors.

argparse builds its texts through ``gettext`` (``argparse._`` and ``argparse.ngettext``), looked
up when each text is made. :class:`SpanishArgumentParser` swaps those two names for a Spanish
catalogue while one of its own methods runs, and restores them afterwards, so no other parser in
the process changes language. Messages argparse only shows to programmers (a misconfigured
parser) stay in English.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

#: argparse's user-facing texts (Python 3.9 to 3.13) and their translations.
CATALOGUE = {
    "usage: ": "uso: ",
    "positional arguments": "argumentos",
    "optional arguments": "opciones",  # Python 3.9
    "options": "opciones",
    "show this help message and exit": "muestra esta ayuda y termina",
    "show program's version number and exit": "muestra la versión del programa y termina",
    "%(prog)s: error: %(message)s\n": "%(prog)s: error: %(message)s\n",
    "argument %(argument_name)s: %(message)s": "argumento %(argument_name)s: %(message)s",
    "unrecognized arguments: %s": "argumentos no reconocidos: %s",
    "the following arguments are required: %s": "faltan los argumentos obligatorios: %s",
    "one of the arguments %s is required": "se necesita uno de los argumentos %s",
    "expected one argument": "se esperaba un valor",
    "expected at most one argument": "se esperaba un valor como mucho",
    "expected at least one argument": "se esperaba un valor como mínimo",
    "ambiguous option: %(option)s could match %(matches)s":
        "opción ambigua: %(option)s puede ser %(matches)s",
    "ignored explicit argument %r": "no admite valor: %r",
    "not allowed with argument %s": "no se permite junto con el argumento %s",
    "invalid %(type)s value: %(value)r": "valor no válido (%(type)s): %(value)r",
    "invalid choice: %(value)r (choose from %(choices)s)":
        "opción no válida: %(value)r (elija entre %(choices)s)",
    "unexpected option string: %s": "opción inesperada: %s",
    "can't open '%(filename)s': %(error)s": "no se puede abrir '%(filename)s': %(error)s",
}

#: Plural texts: (singular, plural) -> (singular, plural).
PLURALS = {
    ("expected %s argument", "expected %s arguments"): ("se esperaba %s valor",
                                                        "se esperaban %s valores"),
}


def _gettext(message: str) -> str:
    return CATALOGUE.get(message, message)


def _ngettext(singular: str, plural: str, count: int) -> str:
    one, many = PLURALS.get((singular, plural), (singular, plural))
    return one if count == 1 else many


_swap_lock = threading.RLock()


@contextlib.contextmanager
def spanish() -> Iterator[None]:
    """Within the block, argparse's texts are Spanish (one thread at a time swaps them)."""
    with _swap_lock:
        saved = argparse._, argparse.ngettext  # type: ignore[attr-defined]
        argparse._, argparse.ngettext = _gettext, _ngettext  # type: ignore[attr-defined]
        try:
            yield
        finally:
            argparse._, argparse.ngettext = saved  # type: ignore[attr-defined]


class SpanishArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with every text a user sees in Spanish (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with spanish():
            super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        with spanish():  # the default help of "version" and "help" actions is made here
            return super().add_argument(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        with spanish():
            return super().parse_known_args(args, namespace)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        with spanish():  # "unrecognized arguments" is reported here, after parse_known_args
            return super().parse_args(args, namespace)

    def format_usage(self) -> str:
        with spanish():
            return super().format_usage()

    def format_help(self) -> str:
        with spanish():
            return super().format_help()

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):  # Python 3.9 formats this prefix without gettext
            message = "argumento " + message[len("argument "):]
        with spanish():
            super().error(message)
