"""The ``quantsink`` command line: thin commands that build a RunConfig and call the library.

Nothing outside this package imports it (``tests/test_architecture.py``).
"""

from __future__ import annotations

from . import (compare_cmd, eval_cmd, explain_cmd, inspect_cmd, list_cmd, models_cmd, reproduce_cmd,  # noqa: F401
               sweep_cmd, testbed_cmd)  # (register the commands)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
