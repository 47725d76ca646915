"""``quantsink explain [RUN]``: renders :mod:`quantsink.analysis.explain` (tables, summary, ``--json``, ``--plot``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..config import RunConfig
from .common import PREPARE_FIELDS, RichProgress, app, config_options, friendly, out, progress_enabled, quiet


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def sites_table(sites: dict[str, Any], top: int) -> Table:
    bits = sites["bits"]
    table = Table(title=f"quantized sites, widest range ratio first (int{bits or '-'} "
                        f"{sites['granularity'] or ''} activations)", title_justify="left")
    for column in ("site", "absmax", "without extreme", "ratio", "step", "step without", "sink sets scale"):
        table.add_column(column, justify="left" if column == "site" else "right", no_wrap=True)
    for r in sites["rows"][:top]:
        table.add_row(r["site"], _f(r["absmax"]), _f(r["absmax_without_extreme"]), _f(r["ratio"], 3),
                      _f(r.get("step"), 3), _f(r.get("step_without_extreme"), 3), "yes" if r["sink_sets_scale"] else "")
    table.caption = sites["note"] or f"{len(sites['set_by_sink'])} of {len(sites['rows'])} sites set by the sink; " \
                                     f"{sites['definition']}"
    return table


def positions_table(pos: dict[str, Any]) -> Table:
    table = Table(title="NLL increase over the reference by target position (nats/token)", title_justify="left")
    for column in ("positions", "tokens", "scheme", "sink kept in full precision"):
        table.add_column(column, justify="right")
    for b in pos["buckets"]:
        table.add_row(b["positions"], str(b["tokens"]), _f(b["increase"], 3), _f(b["increase_sink_kept"], 3))
    table.add_row("all", "", _f(pos["increase"], 3), _f(pos["increase_sink_kept"], 3))
    return table


def layers_table(layers: list[dict[str, Any]], d_sink: dict[str, Any]) -> Table:
    table = Table(title=f"d_sink {d_sink['nats_per_token']:.3g} nats/token split by layer (sink kept in full "
                        f"precision in that layer only)", title_justify="left")
    for column in ("layer", "d_sink part", "95% CI", "share"):
        table.add_column(column, justify="right")
    for r in layers:
        lo, hi = r["ci95"]
        table.add_row(str(r["layer"]), _f(r["d_sink"], 3), f"[{_f(lo, 3)}, {_f(hi, 3)}]",
                      "-" if r["share"] is None else f"{100 * r['share']:.0f}%")
    return table


def render(view: dict[str, Any], top: int) -> None:
    out.print(sites_table(view["sites"], top))
    if view.get("positions"):
        out.print(positions_table(view["positions"]))
    if view.get("layers"):
        out.print(layers_table(view["layers"], view["d_sink"]))
    elif view.get("d_sink"):
        d = view["d_sink"]
        where = "measured here" if d.get("measured") else "stored none / sink-fp runs"
        out.print(f"d_sink ({where}): {d['nats_per_token']:.3g} nats/token "
                  f"[{d['ci95'][0]:.3g}, {d['ci95'][1]:.3g}]", highlight=False)
    out.print(view["summary"], highlight=False, soft_wrap=True)


def _layers(text: str) -> list[int] | None:
    """``all`` | ``none`` | ``0,3,5-9``."""
    from ..errors import UsageError

    if text == "all":
        return None
    if text == "none":
        return []
    try:
        return sorted({i for part in text.split(",") for i in _span(part)})
    except ValueError:
        raise UsageError(f"--layers {text!r}: give all, none, or indices like 0,3,5-9 (ranges low-high, "
                         f"each index from 0 to the model's last block)") from None


def _span(part: str) -> range:
    """``5`` or ``5-9`` (inclusive); a reversed or negative range is refused, never read as none."""
    lo, _, hi = part.strip().partition("-")
    first, last = int(lo), int(hi or lo)
    if first > last or first < 0 or last > MAX_LAYER:
        raise ValueError(part)
    return range(first, last + 1)


MAX_LAYER = 10_000  # no model has more blocks; a larger index is a typo, refused before any set is built


def _from_record(run: str, results: str) -> Any:
    from quantsink.analysis.compare import resolve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve(run, results)


@app.command("explain")
@friendly
@config_options(*PREPARE_FIELDS, "results")
def explain_command(
    config: RunConfig,
    run: Optional[str] = typer.Argument(None, help="A stored run (run id, record file, or SCHEME[+MITIGATIONS]); "
                                                   "without it, the run the options describe."),
    record_only: bool = typer.Option(False, "--record-only", help="Only what the stored record holds "
                                     "(sites, stored d_sink); run no passes."),
    layers: str = typer.Option("all", help="Blocks for the per-layer d_sink split: all, none, or e.g. 0,3,5-9."),
    top: int = typer.Option(12, min=1, help="How many sites to list."),
    json_out: bool = typer.Option(False, "--json", help="Print the data as JSON."),
    plot: Optional[Path] = typer.Option(None, help="Write the plot (PNG) here."),
) -> None:
    """Where the damage comes from: per quantized site the range with and without the extreme tokens;
    per position the NLL increase; d_sink split by layer; a short summary."""
    from quantsink.analysis import explain as E
    from ..errors import UsageError
    from ..io import atomic_write_bytes, check_writable_file

    quiet()
    chosen = _layers(layers)
    if plot is not None:
        check_writable_file(plot, "--plot")  # before the passes
    record = _from_record(run, config.results) if run else None
    if record_only:
        if record is None:
            raise UsageError("--record-only needs a stored RUN")
        view = E.explain_record(record, d_sink=_stored_d_sink(record, config.results))
    else:
        source = record.config if record else config
        with RichProgress(enabled=progress_enabled(json_out)) as bar:
            data = E.measure(source, chosen, progress=bar.stage)
        view = E.explain_measured(source, record.scheme if record else E.scheme_record(source), data,
                                  record.run_id if record else None)
    if plot is not None:
        atomic_write_bytes(plot, E.plot(view))
    if json_out:
        out.print_json(json.dumps(view, default=str))
    else:
        render(view, top)
        if plot is not None:
            out.print(f"wrote {plot}", highlight=False)


def _stored_d_sink(record: Any, results: str) -> dict[str, Any] | None:
    from quantsink.analysis.effects import effects
    from quantsink.records.store import find_record

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effects(record, lambda rid: find_record(results, rid)).d_sink
