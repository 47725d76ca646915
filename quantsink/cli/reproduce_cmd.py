"""``quantsink reproduce RUN``: renders :func:`quantsink.analysis.reproduce.reproduce`."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import typer

from .common import RichProgress, app, friendly, out, progress_enabled, quiet


def summary_line(result: Any) -> str:
    verdicts = [c.verdict for c in result.checks]
    if not result.reproduced:
        return f"not reproduced: {verdicts.count('different')} of {len(verdicts)} metrics different"
    if all(v == "bit-identical" for v in verdicts):
        return "reproduced: every metric bit-identical"
    return f"reproduced within the noise margin ({verdicts.count('within margin')} metrics not bit-identical)"


def lines(result: Any, seconds: float) -> list[str]:
    r, c = result.original, result.original.config
    head = [f"reproduce {r.run_id} ({r.model.name} · {r.corpus.name} · {c.scheme} + {c.mitigation}), "
            f"recorded {r.created_at}; re-run in {seconds:.0f} s",
            "re-run's run id: " + ("the same" if result.same_run_id else
                                   f"{result.rerun.run_id}, not the record's (the code or the config's defaults "
                                   f"changed since it was written)")]
    body = [f"  {check.text()}" for check in result.checks]
    env = ["environment: the same facts"] if not result.env_differences else \
        ["environment facts that differ (record vs now):"] + [f"  {d}" for d in result.env_differences]
    return head + body + env + [summary_line(result)]


@app.command("reproduce")
@friendly
def reproduce_command(
    run: str = typer.Argument(..., help="Run id, record file, or SCHEME[+MITIGATIONS] in --results."),
    results: str = typer.Option("results/runs", help="Directory of run records."),
    json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Re-run a stored record from its config (in a temporary results directory with its own reference
    cache: nothing stored is read or overwritten) and say, per metric, bit-identical, within the record's
    noise margin, or different (with the size), and which environment facts differ.

    Exit 0: every metric bit-identical or within the margin; 1: some metric different; 2: bad input."""
    from quantsink.analysis.compare import resolve
    from quantsink.analysis.reproduce import reproduce
    from quantsink.records.store import find_record

    quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # files that are no current records are skipped silently here
        record = resolve(run, results)
    stored = Path(results).is_dir()
    t0 = time.perf_counter()
    with RichProgress(enabled=progress_enabled(json_out)) as progress:
        result = reproduce(record, lambda rid: find_record(results, rid) if stored else None, progress=progress)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=1) + "\n")
    else:
        for line in lines(result, time.perf_counter() - t0):
            out.print(line, highlight=False, soft_wrap=True)
    if not result.reproduced:
        raise typer.Exit(1)
