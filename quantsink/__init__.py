"""quantsink: what quantization does to an LLM's extreme tokens, and whether a mitigation helps.

Python API::

    from quantsink import RunConfig, run
    record = run(RunConfig(model="smollm2-135m", scheme="int8", corpus="python-docs"))
"""

from .config import RunConfig, __version__
from .errors import QuantsinkError

__all__ = ["RunConfig", "QuantsinkError", "__version__", "run"]


def run(config: RunConfig, **kwargs):  # noqa: ANN001,ANN201 - thin lazy wrapper
    """Evaluate ``config`` and return its record (see ``quantsink.run.run``)."""
    from .run import run as _run

    return _run(config, **kwargs)
