"""The one exception type for mistakes a user can make (bad input, missing files)."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line and exits with status 2."""
