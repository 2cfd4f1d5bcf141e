"""User-facing errors.

A :class:`DeftError` is a mistake a user can make (a bad path, a bad parameter, a corrupt file).
The command line turns it into one line on stderr and exit code 2; everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class DeftError(Exception):
    """A problem caused by the user's input; the message is shown as one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
