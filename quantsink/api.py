"""The Python API: ``run`` scores one run; ``evaluate`` plans a config with its variant runs (the
unmitigated twin of a mitigated run), runs them in this process and returns the record with its effects,
as ``quantsink eval`` does."""

from __future__ import annotations

from typing import Any

from quantsink.config import RunConfig


def run(config: RunConfig, **kwargs: Any) -> Any:
    """Evaluate ``config`` alone -> its ``RunRecord`` (``quantsink.pipeline.run.run``)."""
    from quantsink.pipeline.run import run as run_one

    return run_one(config, **kwargs)


def evaluate(config: RunConfig, **kwargs: Any) -> Any:
    """Plan ``config`` with its variant runs, run them in-process -> ``(record, effects)``."""
    from quantsink.pipeline.execute import run_config

    return run_config(config, **kwargs)
