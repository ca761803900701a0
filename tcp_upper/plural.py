"""Counts in Spanish log lines: ``1 cliente``, ``2 clientes``."""

from __future__ import annotations


def plural(count: int, one: str, many: str) -> str:
    """*count* followed by *one* when it is 1, by *many* otherwise (0 clientes, 2 clientes)."""
    return f"{count} {one if count == 1 else many}"
