"""What every command shares: the app, the consoles, one-line errors, options generated from RunConfig."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
import typing
import warnings
from typing import Any, Callable

import typer
import typer.main
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from ..config import RunConfig, __version__
from ..env import quiet_libraries
from ..errors import QuantsinkError

EXIT_CODES = ("Exit codes: 0 done; 1 a failure while running (a reproduction that differs, a download or a "
              "pass that failed); 2 bad input (unknown name or option, missing file or folder, bad corpus, a "
              "--device that is not there, an uncached model under --offline), refused before anything runs.")


def _console(stderr: bool = False) -> Console:
    """A terminal's width on a TTY; piped, wide enough that no table or line wraps at 80 columns."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=10_000)


out = _console()
err = _console(stderr=True)


class LazyCommand(TyperCommand):
    """A command whose module is imported only when it runs (its options need torch to be listed)."""

    def __init__(self, name: str, module: str, attr: str, help: str):
        super().__init__(name, help=help)
        self.module, self.attr = module, attr

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        loaded = getattr(importlib.import_module(f"quantsink.cli.{self.module}"), self.attr)
        return typer.main.get_group(loaded).make_context(info_name, args, parent=parent, **extra)


#: name -> (module under quantsink.cli, its Typer, the help line): imported on use, so --help stays fast
LAZY: dict[str, tuple[str, str, str]] = {
    "testbed": ("testbed_cmd", "testbed_app", "The paper's Bigram-Backcopy testbed: train small models and watch "
                                              "the sink, the value-state drain and the residual-state peak appear."),
}


class Group(TyperGroup):
    """The top-level group: the registered commands and the lazy ones."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for name, (module, attr, help_text) in LAZY.items():
            self.add_command(LazyCommand(name, module, attr, help_text), name)


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, epilog=EXIT_CODES,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Measure what quantization does to an LLM's extreme tokens (attention sinks, "
                       "value-state drains, residual-state peaks) and whether a mitigation helps.")


def _version(value: bool) -> None:
    if value:
        out.print(f"quantsink {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version and exit.")) -> None:
    """Measure what quantization does to an LLM's extreme tokens (attention sinks, value-state drains,
    residual-state peaks) and whether a mitigation helps."""


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


#: the RunConfig fields a command that prepares a model, a corpus and a scheme (no run record) reads
PREPARE_FIELDS = ("model", "scheme", "mitigation", "corpus", "window", "stride", "max_tokens", "bos", "protocol",
                  "device", "dtype", "calib_windows", "seed", "trust_remote_code", "offline", "batch_tokens")


def config_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``with_config_options`` limited to the RunConfig fields ``names`` (the others keep their defaults),
    so a command's help lists only the options it uses."""
    return functools.partial(with_config_options, only=names)


def with_config_options(func: Callable[..., Any], only: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Give ``func`` one CLI option per RunConfig field (or per field in ``only``); it receives
    ``config=RunConfig(...)``.

    The RunConfig dataclass is the single parameter list: defaults and help
    text come from its fields, so CLI, API and record never drift apart.
    """
    hints = typing.get_type_hints(RunConfig)
    own = [p for name, p in inspect.signature(func).parameters.items() if name != "config"]
    fields = {f.name: f for f in dataclasses.fields(RunConfig) if not only or f.name in only}

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


def progress_enabled(json_out: bool) -> bool:
    """Progress on stderr only for a person watching: not under --json, not when stdout or stderr is piped."""
    return not json_out and out.is_terminal and err.is_terminal


class RichProgress:
    """A progress bar per stage (a spinner with the elapsed time for a stage without counts), on stderr."""

    def __init__(self, enabled: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16),
                            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=err,
                            disable=not enabled, transient=True)

    def stage(self, stage: str) -> None:
        """A stage without counts (loading, calibration, one explain pass)."""
        self(stage, None)

    def __call__(self, stage: str, total: int | None) -> Callable[[int], None]:
        """A new stage: the previous one's bar goes; ``total`` None is a stage without counts (a spinner)."""
        for task in list(self.bar.task_ids):
            self.bar.remove_task(task)
        task = self.bar.add_task(f"{stage} windows" if total else stage, total=total or None)
        return lambda n: self.bar.advance(task, n)

    def __enter__(self) -> "RichProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)
