"""The ``quantsink`` command line: thin commands that build a RunConfig and call the library.

Nothing outside this package imports it (``tests/test_architecture.py``).
"""

from __future__ import annotations

import sys

from . import (compare_cmd, eval_cmd, explain_cmd, inspect_cmd, list_cmd, models_cmd, reproduce_cmd,  # noqa: F401
               show_cmd, sweep_cmd)  # (register the commands; testbed_cmd loads on use: common.LAZY)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    from ..env import go_offline, offline_requested

    if offline_requested(sys.argv[1:]):  # before any library that could reach the hub is imported
        go_offline()
    app()


if __name__ == "__main__":
    main()
