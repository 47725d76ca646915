"""``inspect``: a model's extreme tokens per layer and head, what a scheme (and mitigations) do to them,
and how they depend on the corpus.

Runs only the first ``--stats-windows`` windows (eager attention, every probe of
:mod:`quantsink.hooks.sites` on), once for the reference, once for the candidate
(``--scheme``, with ``--mitigation`` applied exactly as ``eval`` applies it;
``--scheme fp32`` without mitigation inspects the reference alone) and once for
the reference on ``--compare-corpus``.  The report's ``stats`` object has the
shape of a run record's ``stats`` (``reference``, ``candidate``, ``changes``).
Nothing is written but the optional plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantsink.measure import stats as S
from quantsink.config import RunConfig
from quantsink.errors import UsageError

MAP_SIZE = 96  # top-left crop of the attention maps kept for the plot
REFERENCE_ONLY = "fp32"


@dataclass
class Probed:
    """One probed pass: its stats summary, pass result and first-window attention maps."""

    stats: dict[str, Any]
    result: Any
    maps: Any  # (L, H, m, m) tensor or None


def probe(model: Any, windows: Any, config: RunConfig, **pass_kwargs: Any) -> Probed:
    from quantsink.measure.passes import run_pass
    from quantsink.measure.collector import StatsCollector

    with StatsCollector(model, stats_windows=len(windows), keep_maps=MAP_SIZE) as collector:
        result = run_pass(model, windows, batch_context=collector.batch_context, boundaries=collector.boundaries,
                          batch_tokens=config.batch_tokens, **pass_kwargs)
    return Probed(collector.summary(tuple(windows.sink_positions)), result, collector.maps)


def probe_candidate(prep: Any, windows: Any, reference: Probed) -> tuple[Probed, dict[str, Any]]:
    """The candidate built as ``eval`` builds it, its mitigations' windows and hooks on."""
    from quantsink.measure.passes import ReferenceHead
    from quantsink.pipeline.run import build_candidate

    model, notes = build_candidate(prep)
    windows = prep.mitigations.windows(windows)
    with prep.mitigations.attach(model):
        probed = probe(model, windows, prep.config, reference=reference.result.targets,
                       reference_head=ReferenceHead.of(prep.loaded.model))
    return probed, notes


def inspect(config: RunConfig, compare_corpus: str | None = None, top: int = 10,
            progress: Callable[[str], None] = lambda stage: None) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (JSON-ready report, attention maps by side); ``progress`` is told each stage."""
    from quantsink.pipeline.run import Session, prepare

    session = Session()
    progress("loading the model and the corpus")
    prep = prepare(config, session)
    n = min(config.stats_windows, len(prep.windows))
    if n < 1:
        raise UsageError("inspect needs --stats-windows >= 1")
    windows = prep.windows.subset(slice(0, n))
    with_candidate = prep.scheme.name != REFERENCE_ONLY or bool(prep.mitigations)
    progress(f"reference: probes on {n} windows")
    ref = probe(prep.loaded.model, windows, config, keep_targets=with_candidate)
    report = _report(prep, n, ref)
    maps = {"reference": ref.maps}
    if with_candidate:
        progress(f"candidate {prep.scheme.spec()}: quantizing and probing")
        maps[prep.scheme.spec()] = _add_candidate(report, prep, windows, ref, top)
    if compare_corpus:
        progress(f"reference on {compare_corpus}")
        maps.update(_add_compare(report, config.replace(corpus=compare_corpus), session, ref, n, top))
    return report, maps


def _report(prep: Any, n: int, ref: Probed) -> dict[str, Any]:
    return {
        "model": prep.loaded.info.to_record(), "corpus": prep.corpus.name, "scheme": prep.scheme.spec(),
        "mitigation": prep.mitigations.record(),
        "protocol": {**prep.protocol, "n_windows": n, "tokens": n * prep.config.window},
        "stats": {"reference": ref.stats, "candidate": None, "changes": None},
        "metrics": {"reference_ppl": ref.result.summary()["ppl"]},
    }


def _add_candidate(report: dict[str, Any], prep: Any, windows: Any, ref: Probed, top: int) -> Any:
    cand, notes = probe_candidate(prep, windows, ref)
    summary = cand.result.summary()
    report["stats"].update(candidate=cand.stats, changes=S.changes(ref.stats, cand.stats, top))
    report["applied"] = notes
    report["mitigation"] = prep.mitigations.record()  # now with what each mitigation did
    report["metrics"].update(candidate_ppl=summary["ppl"], kl=summary["kl"], top1_agreement=summary["top1_agreement"])
    return cand.maps


def _add_compare(report: dict[str, Any], config: RunConfig, session: Any, ref: Probed, n: int,
                 top: int) -> dict[str, Any]:
    from quantsink.pipeline.run import prepare

    other = prepare(config, session)
    probed = probe(other.loaded.model, other.windows.subset(slice(0, min(n, len(other.windows)))), config)
    report["compare"] = {"corpus": other.corpus.name, "stats": probed.stats,
                         **S.domain_dependence(ref.stats, probed.stats, top)}
    return {f"reference on {other.corpus.name}": probed.maps}


def focus_head(report: dict[str, Any]) -> str:
    """The most-changed head (candidate), else the most domain-dependent, else the strongest sink."""
    changes = report["stats"]["changes"]
    if changes and changes["sink_shifts"]:
        return changes["sink_shifts"][0]["head"]
    if report.get("compare") and report["compare"]["heads"]:
        return report["compare"]["heads"][0]["head"]
    table = report["stats"]["reference"]["heads"]["sink_score"]
    best = max(((v or 0, l, h) for l, row in enumerate(table) for h, v in enumerate(row)))
    return f"L{best[1]}H{best[2]}"


def _sides(report: dict[str, Any]) -> dict[str, Any]:
    sides = {"reference": report["stats"]["reference"]}
    if report["stats"]["candidate"] is not None:
        sides[report["scheme"]] = report["stats"]["candidate"]
    if "compare" in report:
        sides[f"reference on {report['compare']['corpus']}"] = report["compare"]["stats"]
    return sides


def write_plots(report: dict[str, Any], maps: dict[str, Any], directory: Path) -> list[Path]:
    from quantsink.analysis import plots

    sides, ref = _sides(report), report["stats"]["reference"]
    name = f"{report['model']['name']} on {report['corpus']}"
    paths = [plots.residual_profile(sides, directory / "residual_profile.png", f"residual-state peak: {name}")]
    if ref["heads"]["sink_score"] is not None:
        paths.append(plots.head_heatmaps(sides, "sink_score", directory / "sink_score.png",
                                         f"sink score (attention of queries i>=1 on key 0): {name}", vmax=1.0))
    if ref["heads"]["value_drain"] is not None:
        paths.append(plots.head_heatmaps(sides, "value_drain", directory / "value_drain.png",
                                         f"value drain ||v_0|| / median ||v_i||: {name}"))
    head = focus_head(report)
    layer, index = (int(x) for x in head[1:].split("H"))
    shown = {label: m[layer, index].numpy() for label, m in maps.items() if m is not None}
    if shown:
        paths.append(plots.attention_maps(shown, directory / "attention_map.png",
                                          f"{head} on the first window (top-left {MAP_SIZE}x{MAP_SIZE})"))
    return paths
