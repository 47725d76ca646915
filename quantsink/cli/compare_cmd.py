"""``quantsink compare RUN_A RUN_B``: renders :func:`quantsink.compare.compare`."""

from __future__ import annotations

import json
import warnings
from typing import Any, Optional

import typer
from rich.table import Table

from .common import app, friendly, out


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def sides_table(result: dict[str, Any]) -> Table:
    a, b = result["a"], result["b"]
    table = Table(title=f"{a['model']} on {a['corpus']}, {result['windows']}\nsettings: {result['settings']}",
                  title_justify="left")
    for column in ("", "A", "B"):
        table.add_column(column, justify="right" if column else "left")
    for key in ("run_id", "scheme", "mitigation", "ppl", "ppl_ref", "kl", "top1_agreement", "bits_per_byte",
                "simulated"):
        table.add_row(key, _f(a[key]), _f(b[key]))
    return table


def paired_lines(result: dict[str, Any]) -> list[str]:
    p = result["paired"]
    lo, hi = p["ci95"]
    lines = [f"B - A: Δppl {p['delta_ppl']:+.4g} [{lo:+.4g}, {hi:+.4g}] (95% paired t over {p['n_windows']} windows); "
             f"verdict {p['verdict']}: {p['reading']}",
             f"  ΔNLL/token {p['delta_nll_per_token']:+.4g}, ΔKL {_f(p['delta_kl'], 3)}, Δtop-1 {_f(p['delta_top1'], 3)}; "
             f"noise floor {p['noise_floor_nats']:.3g} nats/token"
             + ("" if p["noise_floor_measured"] else " (not measured: 0)")]
    deltas = [w["delta_nll_per_token"] for w in result["per_window"]]
    lines.append("  per-window ΔNLL/token: " + " ".join(_f(d, 3) for d in deltas))
    return lines + ([f"note: {result['evaluator_note']}"] if result["evaluator_note"] else []) + notes(result)


def notes(result: dict[str, Any]) -> list[str]:
    """Settings and environment facts in which A and B differ."""
    found = []
    if result["settings_differ"]:
        found.append(f"note: the runs' settings differ: A {result['settings_differ']['a']}, "
                     f"B {result['settings_differ']['b']}")
    if result["env_differences"]:
        found.append("note: the runs' environments differ (A vs B): " + "; ".join(result["env_differences"]))
    return found


def moved_lines(moved: dict[str, Any] | None, top: int) -> list[str]:
    if moved is None:
        return ["statistics: one of the runs has no candidate statistics"]
    lines = [f"heads woken (dormant in A, active in B): {', '.join(moved['woken']) or 'none'}",
             f"heads put to sleep (active in A, dormant in B): {', '.join(moved['put_to_sleep']) or 'none'}"]
    for key, name in (("sink_shifts", "sink score"), ("drain_shifts", "value drain")):
        items = [f"{s['head']} {_f(s['reference'], 3)}->{_f(s['candidate'], 3)}" for s in moved[key][:top]]
        lines.append(f"largest {name} moves A->B: {'; '.join(items) or 'none'}")
    peaks = [f"L{p['layer']} {_f(p['reference'], 4)}->{_f(p['candidate'], 4)}" for p in moved["peak_shifts"][:top]]
    lines.append(f"largest peak-ratio moves A->B: {'; '.join(peaks) or 'none'}")
    return lines


@app.command("compare")
@friendly
def compare_command(
    run_a: str = typer.Argument(..., help="A: run id, record file, or SCHEME[+MITIGATIONS] (e.g. w8a8+sink-fp)."),
    run_b: str = typer.Argument(..., help="B: same forms as A."),
    results: str = typer.Option("results/runs", help="Directory of run records."),
    model: Optional[str] = typer.Option(None, help="Narrow spec strings to this model."),
    corpus: Optional[str] = typer.Option(None, help="Narrow spec strings to this corpus."),
    top: int = typer.Option(5, min=1, help="How many moved statistics to list."),
    json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Two runs on the same model, corpus and windows: paired per-window deltas with the interval and
    verdict, KL and top-1 side by side, and the extreme-token statistics that moved most."""
    from quantsink.analysis.compare import compare, resolve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # files that are no current records are skipped silently here
        a = resolve(run_a, results, model=model, corpus=corpus)
        b = resolve(run_b, results, model=model, corpus=corpus)
    result = compare(a, b, top=top)
    if json_out:
        out.print_json(json.dumps(result))
        return
    out.print(sides_table(result))
    for line in paired_lines(result) + moved_lines(result["moved"], top):
        out.print(line, highlight=False, soft_wrap=True)
