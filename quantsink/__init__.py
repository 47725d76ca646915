"""quantsink: what quantization does to an LLM's extreme tokens, and whether a mitigation helps.

Python API::

    from quantsink import RunConfig, evaluate, run
    record = run(RunConfig(model="smollm2-135m", scheme="int8", corpus="python-docs"))  # this run only
    record, effects = evaluate(RunConfig(scheme="w8a8-dyn", mitigation="sink-fp"))   # as `quantsink eval`
"""

import sys
import types

from .config import RunConfig, __version__
from .errors import QuantsinkError

__all__ = ["RunConfig", "QuantsinkError", "__version__", "evaluate", "run"]


def run(config: RunConfig, **kwargs):  # noqa: ANN001,ANN201 - thin lazy wrapper
    """Evaluate ``config`` and return its ``RunRecord`` (see ``quantsink.run.run``)."""
    from .run import run as _run

    return _run(config, **kwargs)


def evaluate(config: RunConfig, **kwargs):  # noqa: ANN001,ANN201 - thin lazy wrapper
    """Plan ``config`` with its variant runs, run them, -> (record, effects) (``quantsink.sweep.run_config``)."""
    from .sweep import run_config

    return run_config(config, **kwargs)


class _Package(types.ModuleType):
    """The package keeps its API functions ``run`` and ``evaluate`` when the submodules of the same names
    load (the import system would otherwise set ``quantsink.run`` to the module on its first import, and
    ``from quantsink import run`` would give a module).  The modules stay ``sys.modules["quantsink.run"]``."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("run", "evaluate") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
