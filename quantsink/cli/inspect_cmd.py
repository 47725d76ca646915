"""``quantsink inspect``: renders :func:`quantsink.inspection.inspect` (tables, JSON, plots)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..config import RunConfig
from .common import PREPARE_FIELDS, RichProgress, app, config_options, err, friendly, out, progress_enabled, quiet


# --------------------------------------------------------------------------- rendering


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value / 1e3:.{digits}g}k" if abs(value) >= 1e3 else f"{value:.{digits}g}"
    return str(value)


def profile_table(report: dict[str, Any]) -> Table:
    ref, cand = report["stats"]["reference"], report["stats"]["candidate"]
    proto = report["protocol"]
    title = (f"{report['model']['name']} on {report['corpus']}: extreme-token profile, "
             f"{proto['n_windows']} windows x {proto['window']} tokens, BOS {proto['bos']}"
             + (f"; reference -> {report['scheme']}" if cand else ""))
    table = Table(title=title, title_justify="left")
    columns = ["layer", "peak ratio", "massive", "at (pos,ch)", "sink score", "drain", "dormant"]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for i, row in enumerate(ref["layers"]):
        other = cand["layers"][i] if cand else None

        def pair(key: str, digits: int = 3) -> str:
            text = _f(row.get(key), digits)
            return f"{text}->{_f(other.get(key), digits)}" if other else text

        where = f"{row['massive_position']},{row['massive_channel']}"
        if other and (other["massive_position"], other["massive_channel"]) != (row["massive_position"],
                                                                             row["massive_channel"]):
            where += f"->{other['massive_position']},{other['massive_channel']}"
        table.add_row(str(row["layer"]), pair("residual_peak_ratio"), pair("massive_activation"), where,
                      pair("sink_score", 2), pair("value_drain", 2), pair("dormant_heads"))
    return table


def changes_lines(report: dict[str, Any], top: int) -> list[str]:
    diff, metrics = report["stats"]["changes"], report["metrics"]
    lines = [f"perplexity {metrics['reference_ppl']:.4g} -> {metrics['candidate_ppl']:.4g}, "
             f"KL {metrics['kl']:.3g}, top-1 agreement {metrics['top1_agreement']:.3f} (stats windows only)",
             f"heads woken (dormant -> active): {', '.join(diff['woken']) or 'none'}",
             f"heads put to sleep (active -> dormant): {', '.join(diff['put_to_sleep']) or 'none'}",
             f"mean |sink-score shift|: {_f(diff['mean_abs_sink_shift'])}"]
    for key, name in (("sink_shifts", "sink score"), ("drain_shifts", "value drain")):
        items = [f"{s['head']} {_f(s['reference'])}->{_f(s['candidate'])}" for s in diff[key][:top]]
        lines.append(f"largest {name} shifts: {'; '.join(items)}")
    peaks = [f"L{p['layer']} {_f(p['reference'])}->{_f(p['candidate'])}" for p in diff["peak_shifts"][:top]]
    lines.append(f"largest peak-ratio shifts: {'; '.join(peaks)}")
    if diff["position_offset"]:
        lines.append(f"(candidate windows carry {diff['position_offset']} extra leading token(s): positions shift)")
    return lines


def compare_table(report: dict[str, Any]) -> Table:
    comp = report["compare"]
    table = Table(title=f"domain dependence: {report['corpus']} (a) vs {comp['corpus']} (b), reference model",
                  title_justify="left")
    for column in ("head", "sink score a", "sink score b", "b - a", "dormant a", "dormant b"):
        table.add_column(column, justify="right")
    for h in comp["heads"]:
        table.add_row(h["head"], _f(h["sink_a"]), _f(h["sink_b"]), _f(h["delta"]), _f(h["dormant_a"]),
                      _f(h["dormant_b"]))
    table.caption = (f"dormant on {report['corpus']} only: {', '.join(comp['dormant_only_a']) or 'none'}; "
                     f"dormant on {comp['corpus']} only: {', '.join(comp['dormant_only_b']) or 'none'}")
    return table


@app.command("inspect")
@friendly
@config_options(*PREPARE_FIELDS, "stats_windows", "dormant_attention", "dormant_queries")
def inspect_command(config: RunConfig,
                    compare_corpus: Optional[str] = typer.Option(
                        None, "--compare-corpus", help="Second corpus: list the heads whose sink score or "
                                                       "dormancy differ most between the two (reference model)."),
                    plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots into this directory."),
                    top: int = typer.Option(10, "--top", help="Entries per list of changes / domain heads."),
                    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout.")) -> None:
    """Per-layer extreme-token profile (peak ratio, massive activation, sink score, value drain, dormant
    heads) on the first --stats-windows windows; with a --scheme other than fp32, what it changes."""
    from quantsink.analysis.inspection import inspect, write_plots

    quiet()
    if plots is not None:
        from quantsink.records.store import check_writable_dir

        check_writable_dir(plots, "--plots")  # before the passes
    with RichProgress(enabled=progress_enabled(json_out)) as bar:
        report, maps = inspect(config, compare_corpus, top, progress=bar.stage)
    if plots is not None:
        report["plots"] = [str(p) for p in write_plots(report, maps, plots)]
    if json_out:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        return
    out.print(profile_table(report))
    if report["stats"]["changes"] is not None:
        for line in changes_lines(report, min(top, 5)):
            out.print(line, highlight=False)
    if "compare" in report:
        out.print(compare_table(report))
    for path in report.get("plots", []):
        err.print(f"plot: {path}", highlight=False)
