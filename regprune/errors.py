"""The one exception type for mistakes a user can make (bad input, missing files)."""

from __future__ import annotations

__all__ = ["UserError", "first_line"]


class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line and exits with status 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters (its type name when the message is
    empty): what a one-line user error quotes of an underlying failure."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
