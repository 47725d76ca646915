"""``quantsink sweep`` and ``quantsink report``: thin commands over sweep.py and report.py."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.table import Table

from quantsink.config import RunConfig
from quantsink.errors import UsageError
from quantsink.sweep.grid import common_fields
from .common import _cli_type, app, err, friendly, out, quiet


def with_common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """One optional CLI option per RunConfig field other than the four axes (help from
    RunConfig); ``func`` receives ``common={field: value}`` with only the options given."""
    hints = typing.get_type_hints(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig) if f.name in common_fields() and f.name != "results"}
    own = list(inspect.signature(func).parameters.values())[:-1]  # all but `common`

    def option(f: dataclasses.Field) -> inspect.Parameter:
        hint = _cli_type(hints[f.name])
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None` -> int
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        default = "RunConfig default" if f.default is None else repr(f.default)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[hint],
                                 default=typer.Option(None, help=f"{f.metadata['help']} (every run; "
                                                                 f"default: grid file, else {default})"))

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        common = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        return func(**kwargs, common={k: v for k, v in common.items() if v is not None})

    wrapper.__signature__ = inspect.Signature(own + [option(f) for f in fields.values()])  # type: ignore[attr-defined]
    return wrapper


def _axis(help_text: str) -> Any:
    return typer.Option(None, help=help_text)


@app.command("sweep")
@friendly
@with_common_options
def sweep_command(
    grid_file: Optional[Path] = typer.Argument(None, help="YAML grid (keys: models, schemes, mitigations, "
                                               "corpora, subgrids, any run option, results, jobs)."),
    models: Optional[str] = _axis("Models, comma-separated (default smollm2-135m)."),
    schemes: Optional[str] = _axis("Schemes, comma-separated specs."),
    mitigations: Optional[str] = _axis("Mitigations, comma-separated; '+' composes (sink-fp+smooth). Default none."),
    corpora: Optional[str] = _axis("Corpora, comma-separated (default python-docs)."),
    results: Optional[str] = typer.Option(None, help="Directory of run records (default results/runs)."),
    jobs: Optional[int] = typer.Option(None, help="Parallel worker processes (default 1)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and whether each is done; run nothing."),
    executor: Optional[str] = typer.Option(None, help="local (worker processes, default) or ray (a Ray cluster)."),
    address: Optional[str] = typer.Option(None, help="Ray: 'auto' joins the running cluster, ray://HOST:10001 "
                                          "a remote one; default: start a local cluster."),
    num_cpus: Optional[float] = typer.Option(None, help="Ray: CPUs per cell (torch threads), default 1."),
    num_gpus: Optional[float] = typer.Option(None, help="Ray: GPUs per cell, fractional allowed (0.25), default 0."),
    common: dict[str, Any] = None,  # type: ignore[assignment]
) -> None:
    """Run a grid of (model x corpus x scheme x mitigation); resumable, skips runs already recorded."""
    quiet()
    from quantsink.records.store import check_writable_dir
    from quantsink.sweep.grid import Grid, load_grid
    from quantsink.pipeline.execute import invalid_runs, validate_names
    from quantsink.sweep import local as sweeps

    grid, options = load_grid(grid_file) if grid_file else (Grid({}), {})
    cli_axes = {"models": models, "schemes": schemes, "mitigations": mitigations, "corpora": corpora}
    axes = {**grid.axes, **Grid.from_mapping({k: v for k, v in cli_axes.items() if v is not None}, "command line").axes}
    grid = dataclasses.replace(grid, axes=axes)
    results = results or options.get("results") or RunConfig.results
    jobs = jobs if jobs is not None else options.get("jobs", 1)
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    ray = _ray_options(executor, address, num_cpus, num_gpus, options)  # before any work, --dry-run too
    check_writable_dir(results, "--results")
    configs = grid.configs({**common, "results": results})
    validate_names(configs)
    planned = sweeps.plan(configs)
    invalid = invalid_runs(planned)
    if dry_run:
        out.print(_plan_table(planned, results, invalid))
        return
    if invalid:
        first = next(p for p in planned if p.index in invalid)
        raise UsageError(f"{len(invalid)} run(s) pair a scheme with a mitigation that cannot apply, e.g. "
                         f"{first.label}: {invalid[first.index]}; drop them (subgrids) or see --dry-run")
    _run_sweep(planned, results, jobs, ray)


def _ray_options(executor: str | None, address: str | None, num_cpus: float | None, num_gpus: float | None,
                 options: dict[str, Any]) -> Any:
    """None for the local executor; else the validated Ray placement (command line over grid file)."""
    executor = executor or options.get("executor", "local")
    if executor not in ("local", "ray"):
        raise UsageError(f"--executor {executor!r}: use local or ray")
    if executor == "local":
        return None
    from quantsink.sweep.ray_cluster import RayOptions, import_ray

    import_ray()  # one line when Ray is missing, before anything runs
    given = {"address": address, "num_cpus": num_cpus, "num_gpus": num_gpus}
    merged = {k: v if v is not None else options.get(k) for k, v in given.items()}
    return RayOptions(**{k: v for k, v in merged.items() if v is not None})


def _plan_table(planned: list[Any], results: str, invalid: dict[int, str]) -> Table:
    from quantsink.records.store import Store

    store = Store(Path(results))
    table = Table(title=f"{len(planned)} runs -> {results}")
    for column in ("#", "model", "corpus", "scheme", "mitigation", "role", "run_id", "status"):
        table.add_column(column)
    for p in planned:
        status = {"done": "done", "newer": "done (newer quantsink)", "invalid": "to run (invalid file set aside)"}.get(
            store.status(p.run_id), "failed before" if store.failure(p.run_id).exists() else "to run")
        if p.index in invalid:
            status = f"invalid: {invalid[p.index]}"
        c = p.config
        role = "variant" if p.variant else "grid"  # variant: a run a grid run's effects pair with
        table.add_row(str(p.index), c.model, c.corpus, c.scheme, c.mitigation, role, p.run_id, status)
    return table


class SweepProgress:
    """A bar over the grid (ETA) and one line per worker with its current run and stage."""

    def __init__(self, total: int, enabled: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=err, disable=not enabled)
        self.grid = self.bar.add_task("grid", total=total)
        self.total = total
        self.workers: dict[int, Any] = {}
        self.labels: dict[int, str] = {}

    def __call__(self, kind: str, worker: int, *args: Any) -> None:
        getattr(self, f"on_{kind}", lambda *a: None)(worker, *args)

    def _task(self, worker: int) -> Any:
        if worker not in self.workers:
            self.workers[worker] = self.bar.add_task("", total=None)
        return self.workers[worker]

    def on_start(self, worker: int, index: int, label: str) -> None:
        self.labels[worker] = label
        self.bar.update(self._task(worker), description=f"  [{worker}] {label}", total=None, completed=0)

    def on_stage(self, worker: int, stage: str, total: int) -> None:
        self.bar.update(self._task(worker), description=f"  [{worker}] {self.labels.get(worker, '')} · {stage}",
                        total=total, completed=0)

    def on_advance(self, worker: int, n: int) -> None:
        self.bar.advance(self._task(worker), n)

    def on_completed(self, worker: int, n: int) -> None:
        self.bar.update(self.grid, completed=n)

    def on_end(self, worker: int, index: int, status: str, seconds: float, error: str) -> None:
        style = "green" if status == "done" else "red"
        tail = f": {error}" if error else ""
        self.bar.console.print(f"[{style}]{status}[/{style}] {self.labels.get(worker, index)} ({seconds:.1f} s){tail}",
                               highlight=False, markup=True, soft_wrap=True)
        self.bar.update(self._task(worker), description=f"  [{worker}] (idle)", total=None, completed=0)

    def __enter__(self) -> "SweepProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)


def _ratios(summary: Any) -> str:
    """Wall time over the candidate passes, and over every pass; none when workers ran in parallel
    (their passes overlap)."""
    if not summary.pass_s or summary.workers != 1:
        return ""
    return (f" (wall / candidate passes {summary.wall_s / summary.pass_s:.2f}, "
            f"/ all passes {summary.wall_s / summary.all_pass_s:.2f})")


def _time_line(summary: Any) -> str:
    """Wall time vs the candidate passes it bought, and where the rest went."""
    stages = {k: v for k, v in summary.stages.items() if v and k != "candidate_s"}
    ratio = _ratios(summary)
    rest = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in stages.items())
    return (f"time: {summary.wall_s:.0f} s wall, {summary.pass_s:.0f} s in candidate passes{ratio}"
            + (f"; summed over the runs: {rest}" if rest else ""))


def _run_sweep(planned: list[Any], results: str, jobs: int, ray: Any = None) -> None:
    from quantsink.sweep import local as sweeps

    store = sweeps.Store(Path(results))
    jobs = sweeps.worker_cap(jobs) if ray is None else jobs  # says when it caps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sweep itself warns about what it keeps
        todo = len(sweeps.pending(planned, store))
    out.print(f"{len(planned)} runs in the grid; {len(planned) - todo} already in {results} (skipped); "
              f"{todo} to run " + (f"on Ray ({ray.num_cpus:g} CPU, {ray.num_gpus:g} GPU per cell)"
                                   if ray else f"with {jobs} worker(s)"),
              highlight=False, soft_wrap=True)
    with SweepProgress(todo, enabled=err.is_terminal) as progress:
        summary = sweeps.sweep(planned, results, jobs=jobs, emit=progress, run_fn=sweeps.default_run, ray=ray)
    out.print(f"sweep: {len(summary.done)} ran, {summary.skipped} skipped (already recorded), "
              f"{len(summary.failed)} failed"
              + (f", {summary.elsewhere} recorded meanwhile by another sweep" if summary.elsewhere else "")
              + (f", {summary.retried} earlier failures retried" if summary.retried else ""), highlight=False)
    if summary.done:
        out.print(_time_line(summary), highlight=False, soft_wrap=True)
    if summary.failed:
        table = Table(title="failed runs (recorded as <run_id>.failed; the next sweep retries them)")
        table.add_column("run")
        table.add_column("error")
        for label, error in summary.failed:
            table.add_row(label, error)
        out.print(table)
    for label in summary.missing:
        out.print(f"[yellow]not finished[/yellow] (held by another sweep or a crashed worker): {label}")
    if summary.crashed_workers:
        out.print(f"[red]worker(s) died with exit codes {summary.crashed_workers}[/red]; re-run to resume")
    if not summary.ok:
        raise typer.Exit(1)


@app.command("report")
@friendly
def report_command(
    results: str = typer.Option("results/runs", help="Directory of run records."),
    out_dir: Path = typer.Option(Path("results"), "--out", help="Where the leaderboard files go."),
    readme: Optional[Path] = typer.Option(None, help="Also put the markdown table between the "
                                          "<!-- leaderboard:start/end --> markers of this file."),
) -> None:
    """Leaderboard (md, csv, json, self-contained html with plots) from every record in --results."""
    from quantsink.report.leaderboard import update_readme, write_report

    if readme is not None:
        _check_readme(readme)  # before any output is written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_report(results, out_dir)
    for warning in caught:
        err.print(f"[yellow]warning:[/yellow] {warning.message}", highlight=False, soft_wrap=True)
    for path in written.paths:
        out.print(f"wrote {path}", highlight=False)
    if readme is not None:
        changed = update_readme(readme, (out_dir / "leaderboard.md").read_text(encoding="utf-8"))
        out.print(f"{'updated' if changed else 'unchanged'}: {readme}", highlight=False)
    out.print(f"{written.n_rows} rows from {written.n_records} records"
              + (f", {written.n_failures} failed runs listed" if written.n_failures else "")
              + (f", {written.n_skipped} files skipped" if written.n_skipped else ""), highlight=False)


def _check_readme(path: Path) -> None:
    """``--readme`` is UTF-8 text with the leaderboard markers, in a folder we can write to."""
    from quantsink.errors import QuantsinkError
    from quantsink.io import check_writable_file, read_text_file
    from quantsink.report.leaderboard import README_END, README_START

    text = read_text_file(path, "--readme")
    start = text.find(README_START)
    if start < 0 or text.find(README_END, start) < 0:
        raise QuantsinkError(f"--readme {path}: no '{README_START}' ... '{README_END}' markers to put the table "
                             f"between (nothing written)")
    check_writable_file(path, "--readme")
