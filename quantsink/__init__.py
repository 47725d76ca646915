"""quantsink: what quantization does to an LLM's extreme tokens, and whether a mitigation helps.

Python API::

    from quantsink import RunConfig, evaluate, run
    record = run(RunConfig(model="smollm2-135m", scheme="int8", corpus="python-docs"))  # this run only
    record, effects = evaluate(RunConfig(scheme="w8a8-dyn", mitigation="sink-fp"))   # as `quantsink eval`

The stages live in sub-packages (``docs/architecture.md``): data -> schemes / mitigations -> hooks ->
measure -> pipeline -> records -> analysis -> report, with sweep and cli on top.
"""

import os

# before torch loads libgomp: llama.cpp shares it, and spinning OpenMP threads made its windows 2-3x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from quantsink.api import evaluate, run  # noqa: E402
from quantsink.config import RunConfig, __version__  # noqa: E402
from quantsink.errors import QuantsinkError  # noqa: E402

__all__ = ["RunConfig", "QuantsinkError", "__version__", "evaluate", "run"]
