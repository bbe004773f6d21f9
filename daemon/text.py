"""Text for a terminal or for systemd: one line, its control characters escaped.

A file name may hold a newline or an escape sequence. Printed raw, it would
split a job across lines or repaint the terminal; sent raw to systemd, whose
notify fields are lines, it would add assignments of its own (``MAINPID=``).
The commands and the running processes both escape with :func:`printable`,
so it lives apart from either.
"""

from __future__ import annotations


def printable(text: str | None) -> str:
    """``text`` on one line: each character that is not printable as its Python escape (``\\n``, ``\\x1b``)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text or "")
