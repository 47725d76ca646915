"""quantsink: what quantization does to an LLM's extreme tokens, and whether a mitigation helps.

Python API::

    from quantsink import RunConfig, evaluate, run
    record = run(RunConfig(model="smollm2-135m", scheme="int8", corpus="python-docs"))  # this run only
    record, effects = evaluate(RunConfig(scheme="w8a8-dyn", mitigation="sink-fp"))   # as `quantsink eval`

The stages live in sub-packages (``docs/architecture.md``): data -> schemes / mitigations -> hooks ->
measure -> pipeline -> records -> analysis -> report, with sweep and cli on top.
"""

from quantsink.api import evaluate, run
from quantsink.config import RunConfig, __version__
from quantsink.errors import QuantsinkError

__all__ = ["RunConfig", "QuantsinkError", "__version__", "evaluate", "run"]
