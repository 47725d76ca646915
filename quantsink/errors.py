"""One exception type for every user-facing failure.

The CLI turns a ``QuantsinkError`` into a one-line message and a non-zero exit
code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QuantsinkError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1


class UsageError(QuantsinkError):
    """Unknown name or malformed spec: the command line itself is wrong."""

    exit_code = 2
