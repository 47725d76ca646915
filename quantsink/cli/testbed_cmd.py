"""``quantsink testbed train``: a thin typer sub-app over :mod:`quantsink.testbed.train`.

Options come from ``TrainConfig``'s fields (defaults and help), so the CLI, the Python API
and the recorded config never drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import types
import typing
from typing import Any, Callable, Optional

import typer

from .common import err, friendly, quiet

testbed_app = typer.Typer(no_args_is_help=True, add_completion=False,
                          help="The paper's Bigram-Backcopy testbed: train small models and watch the sink, "
                               "the value-state drain and the residual-state peak appear.")


def _config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """One option per TrainConfig field; ``func`` receives ``config=TrainConfig(...)``."""
    from ..testbed.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    own = [p for name, p in inspect.signature(func).parameters.items() if name != "config"]

    def option(f: dataclasses.Field) -> inspect.Parameter:
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None` -> Optional[int]
            hint = Optional[next(a for a in typing.get_args(hint) if a is not type(None))]
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hint,
                                 default=typer.Option(f.default, help=f.metadata["help"]))

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        return func(config=TrainConfig(**values), **kwargs)

    wrapper.__signature__ = inspect.Signature(own + [option(f) for f in fields.values()])  # type: ignore[attr-defined]
    return wrapper


class _Bar:
    """A rich progress bar on stderr whose description carries the latest probe."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=err, disable=not enabled)
        self.task = self.bar.add_task("training", total=None)

    def __call__(self, step: int, total: int, summary: dict[str, Any] | None) -> None:
        described = {}
        if summary:
            described["description"] = (f"loss {summary['loss']:.3f}  Attn_<s> {summary['attn_sink']:.2f}  "
                                        f"||v<s>|| {summary['value_norm_sink']:.2f}/{summary['value_norm_others']:.2f}  "
                                        f"||h<s>|| {summary['residual_norm_sink']:.1f}/{summary['residual_norm_others']:.1f}")
        self.bar.update(self.task, completed=step, total=total, **described)


@testbed_app.command("train")
@friendly
@_config_options
def train_command(config: Any,
                  json_out: bool = typer.Option(False, "--json", help="Print the final probe as JSON on stdout.")) -> None:
    """Train a BB model (or resume it from --out), probing Attn_<s>, drain and peak every --eval-every steps."""
    quiet()
    from ..testbed.train import train

    bar = _Bar(enabled=not json_out and err.is_terminal)
    with bar.bar:
        final = train(config, progress=bar)
    if json_out:
        sys.stdout.write(json.dumps(final, indent=1) + "\n")
        return
    err.print(f"trained {final['steps']} steps in {final['seconds']:.0f} s: loss {final['loss']:.3f}, "
              f"Attn_<s> {final['attn_sink']:.3f} (layer {final['sink_layer']}), value norm <s> "
              f"{final['value_norm_sink']:.2f} vs {final['value_norm_others']:.2f}, residual norm <s> "
              f"{final['residual_norm_sink']:.1f} vs {final['residual_norm_others']:.1f}; model in {config.out}")

