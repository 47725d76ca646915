"""``quantsink inspect``: a model's extreme tokens per layer and head, what a scheme does to
them, and how they depend on the corpus.

Runs only the first ``--stats-windows`` windows (eager attention, every probe of
:mod:`quantsink.hooks` on), once for the reference, once for the candidate
(``--scheme``; ``--scheme fp32`` inspects the reference alone) and once for the
reference on ``--compare-corpus``.  Nothing is written but the optional plots.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .cli import app, err, friendly, out, quiet_libraries, with_config_options
from .config import RunConfig
from .errors import UsageError

MAP_SIZE = 96  # top-left crop of the attention maps kept for the plot
REFERENCE_ONLY = "fp32"


@dataclass
class Probed:
    """One probed pass: its stats summary, pass result and first-window attention maps."""

    stats: dict[str, Any]
    result: Any
    maps: Any  # (L, H, m, m) tensor or None


def probe(model: Any, windows: Any, config: RunConfig, **pass_kwargs: Any) -> Probed:
    from .evaluate import run_pass
    from .hooks import StatsCollector

    with StatsCollector(model, stats_windows=len(windows), keep_maps=MAP_SIZE) as collector:
        result = run_pass(model, windows, batch_context=collector.batch_context, boundaries=collector.boundaries,
                          batch_tokens=config.batch_tokens, **pass_kwargs)
    return Probed(collector.summary(tuple(windows.sink_positions)), result, collector.maps)


def _candidate(prep: Any, windows: Any, reference: Probed) -> tuple[Probed, dict[str, Any]]:
    from .evaluate import ReferenceHead
    from .run import build_candidate

    model, notes = build_candidate(prep)
    for mitigation in prep.mitigations:
        windows = mitigation.transform_windows(windows, prep.loaded.tokenizer)
    with ExitStack() as stack:
        for mitigation in prep.mitigations:
            stack.enter_context(mitigation.attach(model))
        probed = probe(model, windows, prep.config, reference=reference.result.targets,
                       reference_head=ReferenceHead.of(prep.loaded.model))
    return probed, notes


def inspect(config: RunConfig, compare_corpus: str | None = None, top: int = 10) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (JSON-ready report, attention maps by side)."""
    from . import stats as S
    from .run import Session, prepare

    session = Session()
    prep = prepare(config, session)
    n = min(config.stats_windows, len(prep.windows))
    if n < 1:
        raise UsageError("inspect needs --stats-windows >= 1")
    windows = prep.windows.subset(slice(0, n))
    with_candidate = prep.scheme.name != REFERENCE_ONLY or bool(prep.mitigations)
    ref = probe(prep.loaded.model, windows, config, keep_targets=with_candidate)
    report: dict[str, Any] = {
        "model": prep.loaded.info.to_record(), "corpus": prep.corpus.name, "scheme": prep.scheme.spec(),
        "mitigation": [m.record() for m in prep.mitigations],
        "protocol": {**prep.protocol, "n_windows": n, "tokens": n * config.window},
        "reference": ref.stats, "metrics": {"reference_ppl": ref.result.summary()["ppl"]},
    }
    maps = {"reference": ref.maps}
    if with_candidate:
        cand, notes = _candidate(prep, windows, ref)
        summary = cand.result.summary()
        report.update(candidate=cand.stats, changes=S.changes(ref.stats, cand.stats, top), applied=notes)
        report["metrics"].update(candidate_ppl=summary["ppl"], kl=summary["kl"],
                                 top1_agreement=summary["top1_agreement"])
        maps[prep.scheme.spec()] = cand.maps
    if compare_corpus:
        other = prepare(config.replace(corpus=compare_corpus), session)
        probed = probe(other.loaded.model, other.windows.subset(slice(0, min(n, len(other.windows)))), config)
        report["compare"] = {"corpus": other.corpus.name, "stats": probed.stats,
                             **S.domain_dependence(ref.stats, probed.stats, top)}
        maps[f"reference on {other.corpus.name}"] = probed.maps
    return report, maps


# --------------------------------------------------------------------------- rendering


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value / 1e3:.{digits}g}k" if abs(value) >= 1e3 else f"{value:.{digits}g}"
    return str(value)


def profile_table(report: dict[str, Any]) -> Table:
    ref, cand = report["reference"], report.get("candidate")
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
    diff, metrics = report["changes"], report["metrics"]
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


def _focus_head(report: dict[str, Any]) -> str:
    """The most-changed head (candidate), else the most domain-dependent, else the strongest sink."""
    if report.get("changes") and report["changes"]["sink_shifts"]:
        return report["changes"]["sink_shifts"][0]["head"]
    if report.get("compare") and report["compare"]["heads"]:
        return report["compare"]["heads"][0]["head"]
    table = report["reference"]["heads"]["sink_score"]
    best = max(((v or 0, l, h) for l, row in enumerate(table) for h, v in enumerate(row)))
    return f"L{best[1]}H{best[2]}"


def write_plots(report: dict[str, Any], maps: dict[str, Any], directory: Path) -> list[Path]:
    from . import plots

    sides = {"reference": report["reference"]}
    if "candidate" in report:
        sides[report["scheme"]] = report["candidate"]
    if "compare" in report:
        sides[f"reference on {report['compare']['corpus']}"] = report["compare"]["stats"]
    name = f"{report['model']['name']} on {report['corpus']}"
    paths = [plots.residual_profile(sides, directory / "residual_profile.png", f"residual-state peak: {name}")]
    if report["reference"]["heads"]["sink_score"] is not None:
        paths.append(plots.head_heatmaps(sides, "sink_score", directory / "sink_score.png",
                                         f"sink score (attention of queries i>=1 on key 0): {name}", vmax=1.0))
    if report["reference"]["heads"]["value_drain"] is not None:
        paths.append(plots.head_heatmaps(sides, "value_drain", directory / "value_drain.png",
                                         f"value drain ||v_0|| / median ||v_i||: {name}"))
    head = _focus_head(report)
    layer, index = (int(x) for x in head[1:].split("H"))
    shown = {label: m[layer, index].numpy() for label, m in maps.items() if m is not None}
    if shown:
        paths.append(plots.attention_maps(shown, directory / "attention_map.png",
                                          f"{head} on the first window (top-left {MAP_SIZE}x{MAP_SIZE})"))
    return paths


@app.command("inspect")
@friendly
@with_config_options
def inspect_command(config: RunConfig,
                    compare_corpus: Optional[str] = typer.Option(
                        None, "--compare-corpus", help="Second corpus: list the heads whose sink score or "
                                                       "dormancy differ most between the two (reference model)."),
                    plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots into this directory."),
                    top: int = typer.Option(10, "--top", help="Entries per list of changes / domain heads."),
                    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout.")) -> None:
    """Per-layer extreme-token profile (peak ratio, massive activation, sink score, value drain, dormant
    heads) on the first --stats-windows windows; with a --scheme other than fp32, what it changes."""
    quiet_libraries()
    report, maps = inspect(config, compare_corpus, top)
    if plots is not None:
        report["plots"] = [str(p) for p in write_plots(report, maps, plots)]
    if json_out:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        return
    out.print(profile_table(report))
    if "changes" in report:
        for line in changes_lines(report, min(top, 5)):
            out.print(line, highlight=False)
    if "compare" in report:
        out.print(compare_table(report))
    for path in report.get("plots", []):
        err.print(f"plot: {path}", highlight=False)
