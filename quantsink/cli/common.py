"""What every command shares: the app, the consoles, one-line errors, options generated from RunConfig."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
import warnings
from typing import Any, Callable

import typer
from rich.console import Console

from ..config import RunConfig
from ..env import quiet_libraries
from ..errors import QuantsinkError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Measure what quantization does to an LLM's extreme tokens (attention sinks, "
                       "value-state drains, residual-state peaks) and whether a mitigation helps.")
out = Console()
err = Console(stderr=True)


def quiet() -> None:
    """Library chatter off; a warning on the terminal is one line."""
    quiet_libraries()
    warnings.showwarning = one_line_warning


def one_line_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                     line: Any = None) -> None:
    """A warning on the terminal is one line: ``warning: <message>`` (no source location)."""
    sys.stderr.write(f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}\n")


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a QuantsinkError into one line on stderr and its exit code."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except QuantsinkError as error:
            err.print(f"[red]error:[/red] {error}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper


def _cli_type(hint: Any) -> Any:
    """Typer-friendly annotation: Literals become plain str (RunConfig validates them)."""
    if typing.get_origin(hint) is typing.Literal:
        return str
    return hint


def with_config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``func`` one CLI option per RunConfig field; it receives ``config=RunConfig(...)``.

    The RunConfig dataclass is the single parameter list: defaults and help
    text come from its fields, so CLI, API and record never drift apart.
    """
    hints = typing.get_type_hints(RunConfig)
    own = [p for name, p in inspect.signature(func).parameters.items() if name != "config"]
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}

    def option(f: dataclasses.Field) -> inspect.Parameter:
        hint = hints[f.name]
        help_text = f.metadata["help"]
        if typing.get_origin(hint) is typing.Literal:
            help_text += " [" + "|".join(map(str, typing.get_args(hint))) + "]"
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_cli_type(hint),
                                 default=typer.Option(f.default, help=help_text))

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        return func(config=RunConfig(**values), **kwargs)

    wrapper.__signature__ = inspect.Signature(own + [option(f) for f in fields.values()])  # type: ignore[attr-defined]
    return wrapper


class RichProgress:
    """A progress bar per stage, on stderr."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=err, disable=not enabled, transient=True)

    def __call__(self, stage: str, total: int) -> Callable[[int], None]:
        task = self.bar.add_task(f"{stage} windows", total=total)
        return lambda n: self.bar.advance(task, n)

    def __enter__(self) -> "RichProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)
