"""quantsink: what quantization does to an LLM's extreme tokens, and whether a mitigation helps.

Python API::

    from quantsink import RunConfig, evaluate, run
    record = run(RunConfig(model="smollm2-135m", scheme="int8", corpus="python-docs"))  # this run only
    record, effects = evaluate(RunConfig(scheme="w8a8-dyn", mitigation="sink-fp"))   # as `quantsink eval`
"""

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
