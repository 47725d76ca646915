"""``quantsink show RUN``: a stored record printed as ``quantsink eval`` prints it (no pass is run)."""

from __future__ import annotations

import warnings

import typer

from .common import app, friendly, quiet
from .eval_cmd import _show


@app.command("show")
@friendly
def show_command(
    run: str = typer.Argument(..., help="Run id, record file, or SCHEME[+MITIGATIONS] in --results."),
    results: str = typer.Option("results/runs", help="Directory of run records."),
    json_out: bool = typer.Option(False, "--json", help="Print {record, effects} as JSON on stdout."),
) -> None:
    """Print a stored run as `eval` printed it: its table (with the mitigation verdict and d_sink from the
    variant records stored beside it), its timing and its record file."""
    from quantsink.analysis.compare import resolve
    from quantsink.analysis.effects import effects
    from quantsink.records.store import find_record

    quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # files that are no current records are skipped silently here
        record = resolve(run, results)
        found = effects(record, lambda rid: find_record(results, rid))
    _show(record, found, json_out, results, [])
