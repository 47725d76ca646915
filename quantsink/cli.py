"""The ``quantsink`` command line: thin commands that build a RunConfig and call the library."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import typing
import warnings
from typing import Any, Callable

import typer
from rich.console import Console
from rich.table import Table

from .config import RunConfig
from .errors import QuantsinkError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Measure what quantization does to an LLM's extreme tokens (attention sinks, "
                       "value-state drains, residual-state peaks) and whether a mitigation helps.")
out = Console()
err = Console(stderr=True)


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, advisory warnings) off the user's terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    warnings.showwarning = one_line_warning
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def result_table(record: dict[str, Any]) -> Table:
    if record.get("mitigation_effect"):
        from .effects import effect_table

        return effect_table(record)
    ref, cand = record["reference"], record["candidate"]
    scheme = record["scheme"]
    label = scheme["spec"] + (" (simulated)" if scheme["simulated"] else "")
    proto = record["protocol"]
    title = (f"{record['model']['name']} on {record['corpus']['name']}: {label}\n"
             f"{proto['n_windows']} windows x {proto['window']} tokens, stride {proto['stride']}, "
             f"BOS {proto['bos']}, {proto['scored_tokens']} scored tokens, {proto['dtype']}")
    table = Table(title=title, title_justify="left")
    for column in ("metric", "reference", "candidate", "delta"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, name in (("ppl", "perplexity"), ("bits_per_byte", "bits per byte")):
        delta = cand[key] - ref[key]
        table.add_row(name, _fmt(ref[key]), _fmt(cand[key]), f"{delta:+.4g} ({delta / ref[key]:+.2%})")
    table.add_row("KL(ref || cand) / token", "0", _fmt(cand.get("kl")), "")
    table.add_row("top-1 agreement", "1", _fmt(cand.get("top1_agreement")), "")
    for task, got in cand.get("lm_eval", {}).items():
        ref_task = ref.get("lm_eval", {}).get(task, {})
        for key in ("word_perplexity", "bits_per_byte", "acc", "acc_norm"):
            if key in got and key in ref_task:
                delta = got[key] - ref_task[key]
                table.add_row(f"lm-eval {task} {key}", _fmt(ref_task[key]), _fmt(got[key]),
                              f"{delta:+.4g} ({delta / ref_task[key]:+.2%})" if ref_task[key] else f"{delta:+.4g}")
    if "d_sink" in record:
        ds = record["d_sink"]
        table.add_row("d_sink (nats/token)", "", f"{ds['nats_per_token']:+.4g}",
                      f"95% CI [{ds['ci95'][0]:+.3g}, {ds['ci95'][1]:+.3g}]")
    return table


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


@app.command("eval")
@friendly
@with_config_options
def eval_command(config: RunConfig,
                 json_out: bool = typer.Option(False, "--json", help="Print the record as JSON on stdout."),
                 no_write: bool = typer.Option(False, "--no-write", help="Do not write the record.")) -> None:
    """Quantize the model with a scheme and compare it with the float reference on the same windows."""
    quiet_libraries()
    from .run import run

    with RichProgress(enabled=not json_out and err.is_terminal) as progress:
        record = run(config, progress=progress, write=not no_write)
    if json_out:
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
        return
    out.print(result_table(record))
    timing = record["timing"]
    cached = " (reference from cache)" if record["reference"]["cached"] else ""
    out.print(f"candidate pass {timing['candidate_s']:.1f} s, "
              f"{timing['candidate_tokens_per_s']:.0f} tokens/s{cached}")
    if "path" in record:
        out.print(f"record: {record['path']}")


def _registry_table(kind: str) -> Table:
    from .registry import Registry

    registry: Registry[Any] = LISTABLE[kind]()
    table = Table(title=f"{kind}")
    table.add_column("name")
    table.add_column("aliases")
    kinds = kind == "mitigations"  # post-hoc / needs-training
    if kinds:
        table.add_column("kind")
    table.add_column("description")
    table.add_column("full config")
    for entry in registry:
        params = entry.obj.record().get("params", {}) if hasattr(entry.obj, "record") else {}
        config = ", ".join(f"{k}={v}" for k, v in params.items())
        table.add_row(entry.name, ", ".join(entry.aliases), *([entry.obj.kind] if kinds else []), entry.help, config)
    return table


def _schemes() -> Any:
    from .schemes import SCHEMES

    return SCHEMES


def _models() -> Any:
    from .models import MODELS

    return MODELS


def _corpora() -> Any:
    from .corpus import CORPORA

    return CORPORA


def _mitigations() -> Any:
    from .mitigations import MITIGATIONS

    return MITIGATIONS


def _tasks() -> Any:
    from .lmeval import TASKS

    return TASKS


LISTABLE: dict[str, Callable[[], Any]] = {
    "models": _models, "schemes": _schemes, "corpora": _corpora, "mitigations": _mitigations,
    "tasks": _tasks,
}


@app.command("list")
@friendly
def list_command(kind: str = typer.Argument(..., help="models | schemes | corpora | mitigations | tasks")) -> None:
    """List what quantsink knows by name."""
    from .registry import Registry

    names: Registry[Any] = Registry("list")
    for key in LISTABLE:
        names.register(key, key)
    out.print(_registry_table(names.get(kind)))


from . import cli_inspect  # noqa: E402,F401  (registers `quantsink inspect`)
from . import cli_sweep  # noqa: E402,F401  (sweep, report)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
