"""Leaderboard: every record in a results directory -> md, csv, json and one self-contained html.

Reads ``RunRecord``s only (``results.iter_records``: validated against the
schema).  One row per full identity (``identity_key``: every field of the run id
but the code version: model, corpus, windows, calibration windows and draws,
dtype, protocol, seed, ...); settings are never mixed.  When several records share a
row (re-runs under another code version), the newest wins and the others are
counted as superseded.  ``settings`` names the identity fields in which the
records differ (beyond model, corpus, scheme, mitigation), so two settings of one
cell are two rows that say which is which.  Every derived number is computed here
from the records, never stored twice:

* ``ppl_ratio`` = candidate ppl / reference ppl; ``delta_bpb`` = candidate - reference bits per byte.
* ``sink_before`` / ``sink_after``: mean over layers and heads of the sink score
  (attention that queries i >= 1 put on key 0), reference / candidate.
* ``drain_before`` / ``drain_after``: mean over layers and KV heads of the value-state drain.
* ``peak_before`` / ``peak_after``: the largest residual-state peak ratio over layers.
* ``heads_woken``: heads dormant in the reference and active in the candidate
  (``stats.changes.woken``: dormant in the reference, active after).
* ``bits``: weight / activation / KV-cache bits, e.g. ``W8A8KV32`` (float parts at the
  run's dtype); ``w_bits``: nominal weight bits (the plot's axis).
* ``effect`` / ``effect_ci``/ ``verdict``: ``effects.mitigation_effect`` against the stored
  unmitigated variant run with the same settings (its run id is ``baseline``; mitigated minus
  unmitigated perplexity, paired t 95% interval over windows); a ``not-applicable`` run (the
  mitigation changed nothing) shows no effect.
* ``env``: where the row's environment (``RunRecord.env``: CPU, threads, library versions) differs
  from its baseline's, the facts that differ; the report notes every environment its records hold.
* ``d_sink`` / ``d_sink_ci``: ``effects.d_sink`` from the stored ``none`` and ``sink-fp`` variant
  runs (sink damage in nats per token); empty when a variant run is not in the results.

Fields a record lacks (no stats, no mitigation) are left empty, never invented.
Everything shown in html is escaped; markdown cells are escaped too.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from quantsink.analysis.compare import identity_key, settings_label, varying_settings
from quantsink.analysis.effects import Effects, effects
from quantsink.report.matrix import MATRIX_CSV, Matrix, cell_text, matrices, matrix_rows, ranking
from quantsink.errors import QuantsinkError
from quantsink.records.schema import RunRecord

COLUMNS = {  # column -> (markdown header, digits); order = table order
    "model": ("model", None), "corpus": ("corpus", None), "settings": ("settings", None), "scheme": ("scheme", None),
    "engine": ("engine", None),
    "mitigation": ("mitigation", None), "bits": ("bits", None), "w_bits": ("weight bits", 3), "ppl_ref": ("ppl ref", 4), "ppl": ("ppl", 4),
    "ppl_ratio": ("ppl ×ref", 4), "kl": ("KL", 3), "kl_p99": ("KL p99", 3), "kl_p999": ("KL p99.9", 3),
    "kl_max": ("KL max", 3), "top1": ("top-1", 3), "bpb": ("bits/byte", 4),
    "delta_bpb": ("Δ bits/byte", 3), "d_sink": ("d_sink", 3), "d_sink_ci": ("d_sink CI", 3),
    "verdict": ("verdict", None), "effect": ("Δppl vs unmitigated", 3), "effect_ci": ("Δppl CI", 3),
    "mde": ("MDE Δppl", 3), "documents": ("documents", None),
    "sink_before": ("sink before", 3), "sink_after": ("sink after", 3),
    "drain_before": ("drain before", 3), "drain_after": ("drain after", 3),
    "heads_woken": ("heads woken", None), "peak_before": ("peak before", 4), "peak_after": ("peak after", 4),
    "simulated": ("simulated", None), "backend": ("backend", None), "protocol": ("protocol", None),
    "run_id": ("run_id", None), "baseline": ("baseline run", None), "env": ("environment vs baseline", None),
    "created_at": ("created", None),
}
MARKDOWN = ("model", "corpus", "settings", "scheme", "engine", "mitigation", "bits", "ppl", "ppl_ratio", "kl", "kl_p99",
            "kl_p999", "kl_max", "top1", "bpb", "d_sink", "verdict", "effect", "effect_ci", "mde", "baseline", "sink_before", "sink_after", "heads_woken",
            "peak_before", "peak_after", "simulated", "backend")
VERDICT_COLORS = {"helps": "#2e7d32", "hurts": "#c62828", "inconclusive": "#757575",
                  "within-noise": "#8d6e63", "lowers-kl": "#66bb6a", "raises-kl": "#ef5350",
                  "insufficient-data": "#9e9e9e", "not-applicable": "#bdbdbd"}
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


# --------------------------------------------------------------------------- record -> row (pure)


def _num(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ci(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_num(v) is not None for v in value):
        return float(value[0]), float(value[1])
    return None


def _mean(matrix: list[list[float | None]] | None) -> float | None:
    values = [v for row in matrix or [] for v in row if _num(v) is not None]
    return sum(values) / len(values) if values else None


def _max(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _side(record: RunRecord, name: str) -> dict[str, Any] | None:
    """``stats.reference`` / ``stats.candidate`` (None without stats)."""
    return None if record.stats is None else getattr(record.stats, name)


def _heads(record: RunRecord, name: str, table: str) -> Any:
    side = _side(record, name)
    return None if side is None else side["heads"].get(table)


def peak_profile(side: dict[str, Any] | None) -> list[float | None]:
    """Per-layer residual-state peak ratio of ``stats.reference`` / ``stats.candidate``."""
    return [_num(layer.get("residual_peak_ratio")) for layer in (side or {}).get("layers", [])]


def bits_label(record: RunRecord) -> str:
    """``W8A8KV32``: weight / activation / KV-cache bits, float parts at the run's dtype."""
    fallback = DTYPE_BITS.get(record.protocol.dtype, 32)
    widths = record.scheme.bit_widths
    return "".join(f"{tag}{widths.get(key) or fallback}"
                   for tag, key in (("W", "weights"), ("A", "activations"), ("KV", "kv")))


def woken_heads(record: RunRecord) -> list[tuple[int, int]] | None:
    """(layer, head) pairs woken by the candidate (``stats.changes.woken``: dormant in the reference,
    active after); None when the record has no attention statistics on both sides (unknown, not zero)."""
    if record.stats is None or record.stats.changes is None or _heads(record, "reference", "dormant_fraction") is None:
        return None
    return [_pair(name) for name in record.stats.changes["woken"]]


def _pair(name: str) -> tuple[int, int]:
    layer, head = name[1:].split("H", 1)  # "L20H5"
    return int(layer), int(head)


def kl_tail(percentiles: dict[str, float] | None) -> dict[str, float | None]:
    """The row's per-token KL percentiles (None where the record kept none)."""
    p = percentiles or {}
    return {"kl_p99": _num(p.get("p99")), "kl_p999": _num(p.get("p99.9")), "kl_max": _num(p.get("max"))}


def protocol_label(record: RunRecord) -> str:
    p = record.protocol
    docs = f" from {p.documents} docs" if p.documents else ""
    return f"{p.n_windows}x{p.window} tok{docs}, stride {p.stride}, BOS {p.bos}, {p.dtype}"


def row(record: RunRecord, effects: Effects | None = None, settings: Iterable[str] = (),
        baseline: RunRecord | None = None) -> dict[str, Any]:
    """One leaderboard row (deltas computed here) from one record, its effects, the names of the settings
    that tell rows apart (``varying_settings``) and the unmitigated run its effect is paired with."""
    ref, cand, scheme = record.reference, record.candidate, record.scheme
    effect, d_sink = (effects.mitigation_effect, effects.d_sink) if effects else (None, None)
    d_sink = d_sink if record.config.mitigation == "none" else None  # the scheme's, on its unmitigated row only
    woken = woken_heads(record)
    verdict = effect["verdict"] if effect else None
    no_effect = effect is None or verdict == "not-applicable"  # shown as such, not as 0 [0, 0]
    bpb_ref, bpb = _num(ref.bits_per_byte), _num(cand.bits_per_byte)
    return {
        "model": record.model.name, "corpus": record.corpus.name, "settings": settings_label(record, settings),
        "scheme": scheme.spec, "engine": record.config.engine,
        "mitigation": record.config.mitigation, "bits": bits_label(record), "w_bits": _num(scheme.bits),
        "ppl_ref": _num(ref.ppl), "ppl": _num(cand.ppl), "ppl_ratio": _ratio(cand.ppl, ref.ppl),
        "kl": _num(cand.kl), **kl_tail(cand.kl_percentiles), "top1": _num(cand.top1_agreement), "bpb": bpb,
        "documents": record.protocol.documents,
        "mde": _num(effect["mde_ppl"]) if effect and verdict == "inconclusive" else None,
        "delta_bpb": bpb - bpb_ref if bpb is not None and bpb_ref is not None else None,
        "d_sink": _num(d_sink["nats_per_token"]) if d_sink else None, "d_sink_ci": _ci(d_sink["ci95"]) if d_sink else None,
        "verdict": verdict, "effect": None if no_effect else _num(effect["delta_ppl"]),
        "effect_ci": None if no_effect else _ci(effect["ci95"]),
        "sink_before": _mean(_heads(record, "reference", "sink_score")),
        "sink_after": _mean(_heads(record, "candidate", "sink_score")),
        "drain_before": _mean(_heads(record, "reference", "value_drain")),
        "drain_after": _mean(_heads(record, "candidate", "value_drain")),
        "heads_woken": None if woken is None else len(woken),
        "peak_before": _max(peak_profile(_side(record, "reference"))),
        "peak_after": _max(peak_profile(_side(record, "candidate"))),
        "simulated": scheme.simulated, "backend": " ".join(x for x in (scheme.backend, scheme.backend_version) if x),
        "protocol": protocol_label(record), "run_id": record.run_id,
        "baseline": (effect or {}).get("baseline", {}).get("run_id"), "env": _env_note(record, baseline),
        "created_at": record.created_at,
    }


def _env_note(record: RunRecord, baseline: RunRecord | None) -> str | None:
    """The environment facts in which ``record`` and its baseline differ (None: the same, or no baseline)."""
    if baseline is None or baseline is record:
        return None
    return "; ".join(baseline.env.differences(record.env)) or None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if _num(a) is not None and _num(b) else None


def record_effects(records: list[RunRecord]) -> dict[str, Effects]:
    """Each record's effects from the other records (by run_id); a pair that cannot be paired is
    warned about and left empty."""
    by_id = {r.run_id: r for r in records}
    found = {}
    for record in records:
        try:
            found[record.run_id] = effects(record, by_id.get)
        except QuantsinkError as err:
            warnings.warn(f"{record.run_id}: no effects ({err})", stacklevel=2)
            found[record.run_id] = Effects()
    return found


def leaderboard(records: list[RunRecord]) -> tuple[Any, list[RunRecord], int]:
    """-> (DataFrame, the records behind its rows, number of superseded records).  One row per
    ``identity_key``; a row's effect is paired with the unmitigated run of the same settings."""
    import pandas as pd

    found, by_id, settings = record_effects(records), {r.run_id: r for r in records}, varying_settings(records)
    newest: dict[str, tuple[dict[str, Any], RunRecord]] = {}
    for record in records:
        base = (found[record.run_id].mitigation_effect or {}).get("baseline") or {}
        r = row(record, found[record.run_id], settings, by_id.get(base.get("run_id", "")))
        key = identity_key(record)
        if key not in newest or r["created_at"] >= newest[key][0]["created_at"]:
            newest[key] = (r, record)
    kept = sorted(newest.values(), key=lambda rr: (rr[0]["model"], rr[0]["corpus"], rr[0]["protocol"],
                                                   rr[0]["settings"], rr[0]["mitigation"] != "none",
                                                   rr[0]["scheme"], rr[0]["mitigation"]))
    frame = pd.DataFrame([r for r, _ in kept], columns=list(COLUMNS))
    return frame, [rec for _, rec in kept], len(records) - len(kept)


# --------------------------------------------------------------------------- text formats


def fmt(value: Any, digits: int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, tuple):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}g}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.2e}"
    return str(value)


def md_escape(text: str) -> str:
    """Safe in a markdown table cell: no raw html, no column breaks."""
    return html.escape(text, quote=False).replace("|", "&#124;").replace("\n", " ")


def environment_notes(records: list[RunRecord]) -> list[str]:
    """One line per environment other than the most common one among ``records``: how many records were
    computed in it and which facts differ (CPU, threads, library versions); [] when they share one."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(json.dumps(record.env.facts(), sort_keys=True, default=str), []).append(record)
    ordered = sorted(groups.values(), key=len, reverse=True)
    main = ordered[0] if ordered else []
    return [f"{len(group)} of {len(records)} records were computed in another environment than the other "
            f"{len(main)}: " + "; ".join(main[0].env.differences(group[0].env)) for group in ordered[1:]]


def to_markdown(frame: Any, failures: list[dict[str, Any]], notes: Iterable[str] = ()) -> str:
    protocols = sorted(set(frame["protocol"])) if len(frame) else []
    lines = [f"Protocol: {md_escape('; '.join(protocols))}" if protocols else "No records.", ""]
    lines += [f"Environment: {md_escape(note)}" for note in notes] + ([""] if notes else [])
    rows = frame.to_dict(orient="records") if len(frame) else []
    lines += matrix_markdown(matrices(rows)) + ranking_markdown(ranking(rows))
    headers = [COLUMNS[c][0] for c in MARKDOWN]
    lines += ["**All runs**", "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(md_escape(fmt(r[c], COLUMNS[c][1])) for c in MARKDOWN) + " |")
    if failures:
        lines += ["", f"Failed runs ({len(failures)}):", ""]
        lines += [f"- {md_escape(_failure_label(f))}: {md_escape(str(f.get('error', '')))}" for f in failures]
    return "\n".join(lines) + "\n"


def matrix_markdown(ms: list[Matrix]) -> list[str]:
    """Per model and corpus: scheme x mitigation, Δppl vs the unmitigated scheme and the verdict (★ best)."""
    lines = []
    for m in ms:
        head = ["scheme", "ppl ×ref", *m.mitigations]
        lines += [f"**Which mitigation helps: {md_escape(m.title)}** (Δppl vs the unmitigated scheme, "
                  f"paired t 95% interval over windows; ★ best that helps)", "",
                  "| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for scheme in m.schemes:
            ratio = fmt(_num((m.baseline.get(scheme) or {}).get("ppl_ratio")), 4)
            cells = [cell_text(m.cells.get((scheme, mit))) for mit in m.mitigations]
            lines.append("| " + " | ".join(md_escape(c) for c in (scheme, ratio, *cells)) + " |")
        lines.append("")
    return lines


def ranking_markdown(rank: list[dict[str, Any]]) -> list[str]:
    if not rank:
        return []
    head = ["model", "corpus", "rank", "scheme", "bits", "kernels", "ppl ×ref", "KL", "best mitigation"]
    lines = ["**Schemes ranked by perplexity ratio** (unmitigated)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rank:
        best = f"{r['best_mitigation']} ({fmt(r['best_delta_ppl'], 3)})" if r["best_mitigation"] else ""
        cells = (r["model"], r["corpus"], str(r["rank"]), r["scheme"], r["bits"], r["kernels"],
                 fmt(r["ppl_ratio"], 4), fmt(r["kl"], 3), best)
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return lines + [""]


def _failure_label(failure: dict[str, Any]) -> str:
    c = failure.get("config") or {}
    return " · ".join(str(c.get(k, "?")) for k in ("model", "corpus", "scheme", "mitigation"))


def to_json(frame: Any, failures: list[dict[str, Any]], skipped: list[str], superseded: int,
            notes: Iterable[str] = ()) -> str:
    rows = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
            for r in frame.astype(object).where(frame.notna(), None).to_dict(orient="records")]
    data = {"columns": {c: COLUMNS[c][0] for c in COLUMNS}, "rows": rows,
            "failed": [{k: f.get(k) for k in ("run_id", "config", "error_type", "error", "created_at")}
                       for f in failures],
            "skipped_files": skipped, "superseded_records": superseded, "environments": list(notes),
            "matrix": matrix_rows(matrices(rows)), "ranking": ranking(rows)}
    return json.dumps(data, indent=1, default=str) + "\n"


# --------------------------------------------------------------------------- plots (matplotlib -> PNG)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _subplots(n: int, width: float = 5.0, height: float = 3.6, cols: int = 2) -> tuple[Any, list[Any]]:
    import matplotlib.pyplot as plt

    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


SCHEME_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
                  "#e6550d", "#31a354", "#756bb1", "#636363")
CORPUS_HATCH = ("", "//", "..", "xx", "\\\\")


def scheme_colors(frame: Any) -> dict[str, str]:
    """One colour per scheme, the same in every plot (schemes in sorted order)."""
    schemes = sorted(set(frame["scheme"])) if len(frame) else []
    return {s: SCHEME_PALETTE[i % len(SCHEME_PALETTE)] for i, s in enumerate(schemes)}


def _legend_outside(ax: Any, **kwargs: Any) -> None:
    """The legend to the right of the axes, never over the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, **kwargs)


def plot_ppl_vs_bits(frame: Any) -> bytes | None:
    """Perplexity ratio to the reference per unmitigated scheme, ranked, labelled with its bits
    (hatched: simulated kernels); one panel per model and corpus."""
    data = frame[(frame["mitigation"] == "none") & frame["ppl_ratio"].notna()]
    if data.empty:
        return None
    colors = scheme_colors(frame)
    panels = list(dict.fromkeys(zip(data["model"], data["corpus"])))
    most = max(len(data[(data["model"] == m) & (data["corpus"] == c)]) for m, c in panels)
    fig, axes = _subplots(len(panels), width=5.6, height=max(2.4, 0.28 * most + 1.0))
    for ax, (model, corpus) in zip(axes, panels):
        part = data[(data["model"] == model) & (data["corpus"] == corpus)].sort_values("ppl_ratio")
        ys = range(len(part))
        ax.barh(list(ys), part["ppl_ratio"], color=[colors[s] for s in part["scheme"]],
                hatch=None, edgecolor="white")
        for y, r in zip(ys, part.to_dict(orient="records")):
            if r["simulated"]:
                ax.patches[y].set_hatch("///")
        labels = [f"{r['scheme']}  {r['bits']}" for r in part.to_dict(orient="records")]
        ax.set_yticks(list(ys), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.6)
        wide = part["ppl_ratio"].max() / max(part["ppl_ratio"].min(), 1e-9) > 20
        ax.set(title=f"{model} · {corpus}", xscale="log" if wide else "linear",
               xlabel=f"ppl / reference ppl{' (log)' if wide else ''}; hatched = simulated")
    return _png(fig)


def plot_before_after(frame: Any) -> bytes | None:
    """Sink score, value drain and peak ratio per scheme: candidate (bars, the scheme's colour; one
    hatch per corpus) vs reference (black tick on each bar)."""
    metrics = [("sink", "mean sink score"), ("drain", "mean value drain"), ("peak", "max peak ratio")]
    data = frame[frame["mitigation"] == "none"]
    models = [m for m in dict.fromkeys(data["model"])
              if data[data["model"] == m][[f"{k}_after" for k, _ in metrics]].notna().any().any()]
    if not models:
        return None
    colors = scheme_colors(frame)
    fig, axes = _subplots(len(models) * len(metrics), width=4.6, cols=len(metrics))
    for i, model in enumerate(models):
        part = data[data["model"] == model]
        schemes = sorted(dict.fromkeys(part["scheme"]))
        corpora = list(dict.fromkeys(part["corpus"]))
        width = 0.8 / max(len(corpora), 1)
        for j, (key, title) in enumerate(metrics):
            ax = axes[i * len(metrics) + j]
            for k, corpus in enumerate(corpora):
                sub = part[part["corpus"] == corpus].set_index("scheme").reindex(schemes)
                xs = [x + k * width for x in range(len(schemes))]
                ax.bar(xs, sub[f"{key}_after"].astype(float), width, color=[colors[s] for s in schemes],
                       hatch=CORPUS_HATCH[k % len(CORPUS_HATCH)], edgecolor="white",
                       label=f"{corpus} (hatch {CORPUS_HATCH[k % len(CORPUS_HATCH)] or 'none'})")
                ax.scatter(xs, sub[f"{key}_before"].astype(float), marker="_", s=160, color="black", zorder=3,
                           label="reference" if k == 0 else None)
            ax.set_xticks([x + width * (len(corpora) - 1) / 2 for x in range(len(schemes))], schemes,
                          rotation=45, ha="right", fontsize=7)
            ax.set_ylim(*data_limits(part[[f"{key}_before", f"{key}_after"]].to_numpy(dtype=float).ravel()))
            ax.set_title(f"{model}: {title} (axis from the data)", fontsize=9)
        _legend_outside(axes[i * len(metrics) + len(metrics) - 1])
    return _png(fig)


def data_limits(values: Any, pad: float = 0.25) -> tuple[float, float] | tuple[None, None]:
    """y-limits around the finite ``values`` (``pad`` x their range each side), so that 0.38 -> 0.37 shows
    as a change; (None, None) (matplotlib's own) when there are none."""
    import numpy as np

    finite = values[np.isfinite(values)]
    if not len(finite):
        return None, None
    lo, hi = float(finite.min()), float(finite.max())
    margin = pad * (hi - lo) or 0.05 * abs(hi) or 0.05
    return lo - margin, hi + margin


def plot_peak_profile(frame: Any, records: list[RunRecord]) -> bytes | None:
    """Per-layer residual-state peak ratio: reference (black) and each unmitigated scheme (its colour)."""
    panels: dict[tuple[str, str], list[tuple[str, list[float | None], list[float | None]]]] = {}
    for (_, r), record in zip(frame.iterrows(), records):
        after = peak_profile(_side(record, "candidate"))
        if r["mitigation"] == "none" and any(v is not None for v in after):
            panels.setdefault((r["model"], r["corpus"]), []).append(
                (r["scheme"], peak_profile(_side(record, "reference")), after))
    if not panels:
        return None
    colors = scheme_colors(frame)
    fig, axes = _subplots(len(panels), width=5.6)
    for ax, ((model, corpus), lines) in zip(axes, panels.items()):
        ref = lines[0][1]
        ax.plot(range(len(ref)), [v if v is not None else math.nan for v in ref], color="black", lw=2.2,
                label="reference")
        for scheme, _, after in sorted(lines):
            ax.plot(range(len(after)), [v if v is not None else math.nan for v in after], lw=1,
                    color=colors.get(scheme), label=scheme)
        ax.set(title=f"{model} · {corpus}", xlabel="layer", ylabel="||h_0|| / median ||h_i||", yscale="log")
        _legend_outside(ax)
    return _png(fig)


def woken_counts(frame: Any, records: list[RunRecord]) -> dict[str, tuple[Any, int]]:
    """model -> (layer x head matrix: in how many unmitigated runs each head woke, number of runs)."""
    import numpy as np

    counts: dict[str, tuple[Any, int]] = {}
    for (_, r), record in zip(frame.iterrows(), records):
        woken = woken_heads(record)
        shape = _heads(record, "reference", "sink_score")
        if r["mitigation"] != "none" or woken is None or not isinstance(shape, list) or not shape:
            continue
        layers, heads = len(shape), max(len(row) for row in shape)
        matrix, n = counts.get(r["model"], (np.zeros((layers, heads)), 0))
        for layer, head in woken:
            if layer < matrix.shape[0] and head < matrix.shape[1]:
                matrix[layer, head] += 1
        counts[r["model"]] = (matrix, n + 1)
    return counts


def plot_woken_heatmap(frame: Any, records: list[RunRecord]) -> bytes | None:
    counts = woken_counts(frame, records)
    if not counts:
        return None
    fig, axes = _subplots(len(counts), width=4.2, height=5.0)
    for ax, (model, (matrix, n)) in zip(axes, counts.items()):
        from matplotlib.ticker import MaxNLocator

        top = max(1, int(matrix.max()))  # the scale ends at the most-woken head, not at the run count
        image = ax.imshow(matrix, aspect="auto", cmap="YlOrRd", vmin=0, vmax=top, origin="lower",
                          interpolation="nearest")
        ax.set(title=f"{model}: heads woken ({int(matrix.sum())} in {n} runs)", xlabel="head", ylabel="layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        bar = fig.colorbar(image, ax=ax, label=f"runs (of {n}) in which the head woke")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    return _png(fig)


def plot_verdicts(frame: Any) -> bytes | None:
    """Mitigation effect (Δppl vs the unmitigated scheme) with its 95% CI, colored by verdict;
    and d_sink with its CI where recorded."""
    effect = frame[frame["effect"].notna()]
    sink = frame[frame["d_sink"].notna() & (frame["mitigation"] == "none")]
    panels = [(effect, "effect", "effect_ci", "Δppl, mitigated - unmitigated (95% CI)"),
              (sink, "d_sink", "d_sink_ci", "d_sink, nats/token (95% CI)")]
    panels = [p for p in panels if not p[0].empty]
    if not panels:
        return None
    height = max(3.0, 0.22 * max(len(p[0]) for p in panels) + 1.2)
    fig, axes = _subplots(len(panels), width=7.0, height=height, cols=1)
    for ax, (part, value, ci, title) in zip(axes, panels):
        labels = [f"{r.model} · {r.corpus} · {r.scheme} · {r.mitigation}" for r in part.itertuples()]
        for y, r in enumerate(part.to_dict(orient="records")):
            color = VERDICT_COLORS.get(r["verdict"] or "", "#1565c0") if value == "effect" else "#1565c0"
            lo, hi = r[ci] if isinstance(r[ci], tuple) else (r[value], r[value])
            ax.errorbar(r[value], y, xerr=[[r[value] - lo], [hi - r[value]]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title + _symlog(ax, part[value].to_numpy(dtype=float)), fontsize=9)
    return _png(fig)


def _symlog(ax: Any, values: Any, spread: float = 10.0) -> str:
    """One outlier (+77 beside -1.9) must not squash the others to a line: when the largest |value| is over
    ``spread`` x the median |value|, the axis turns symmetric-log (linear within the median) -> title note."""
    import numpy as np

    sizes = np.abs(values[np.isfinite(values)])
    if not len(sizes) or sizes.max() <= spread * max(float(np.median(sizes)), 1e-12):
        return ""
    ax.set_xscale("symlog", linthresh=max(float(np.median(sizes)), 1e-6))
    return "; symmetric-log axis (linear within the median |value|)"


def plots(frame: Any, records: list[RunRecord]) -> dict[str, bytes | None]:
    """Title -> PNG (None when the records hold no data for it)."""
    import matplotlib

    matplotlib.use("Agg")
    corpus = [f"{c} · {s}" if s else c for c, s in zip(frame["corpus"], frame["settings"])]  # never mix settings
    frame = frame.assign(corpus=corpus)
    text = {c: frame[c].map(lambda v: str(v).replace("$", r"\$")) for c in ("model", "corpus", "scheme", "mitigation")}
    frame = frame.assign(**text)  # a '$' in a name is shown, not read as mathtext
    frame, note = first_groups(frame)
    with matplotlib.rc_context({"font.size": 8}):
        return {
            "Perplexity ratio per scheme, with its bits" + note: plot_ppl_vs_bits(frame),
            "Sink score / value drain / peak ratio before vs after, per scheme" + note: plot_before_after(frame),
            "Per-layer residual-state peak profile" + note: plot_peak_profile(frame, records),
            "Heads woken by quantization" + note: plot_woken_heatmap(frame, records),
            "Mitigation verdicts and sink damage, with 95% CIs" + note: plot_verdicts(frame),
        }


PLOT_GROUPS = 8  # (model, corpus) groups drawn: each adds panels, and the layout's cost grows faster than them


def first_groups(frame: Any) -> tuple[Any, str]:
    """The rows of the first ``PLOT_GROUPS`` (model, corpus) groups, and a note when some are left out
    (the tables list every row; the plots stay fast: 1,000 groups once took 673 s of CPU)."""
    groups = list(dict.fromkeys(zip(frame["model"], frame["corpus"])))
    if len(groups) <= PLOT_GROUPS:
        return frame, ""
    keep = set(groups[:PLOT_GROUPS])
    mask = [pair in keep for pair in zip(frame["model"], frame["corpus"])]
    return frame[mask], f" (first {PLOT_GROUPS} of {len(groups)} model · corpus groups; the tables list all)"


# --------------------------------------------------------------------------- html


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff;max-width:1500px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}h3{font-size:14px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f0f0f0;position:sticky;top:0;user-select:none}table.sortable th{cursor:pointer}
td.t,th.t{text-align:left}td{white-space:nowrap}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
table.sortable tr:nth-child(even){background:#fafafa}.helps{color:#2e7d32;font-weight:600}.hurts{color:#c62828;font-weight:600}
.wrap{overflow-x:auto;max-height:720px}.note{color:#555;font-size:12px;max-width:1100px}figure{margin:12px 0}
img{max-width:100%;border:1px solid #ddd}.fail td{background:#fff3f3;white-space:normal}
table.matrix td{min-width:56px;max-width:120px;white-space:normal}table.matrix td a{color:inherit;text-decoration:none;display:block}
table.matrix th{white-space:normal;max-width:96px;overflow-wrap:anywhere}tr.split td{background:#f6f6f6;font-style:italic}
td.v-helps{background:#c8e6c9}td.v-hurts{background:#ffcdd2}td.v-inconclusive{background:#eeeeee}
td.v-within-noise{background:#efebe9}td.v-lowers-kl{background:#e8f5e9}td.v-raises-kl{background:#ffebee}
td.v-insufficient-data{background:#fff9c4}td.v-not-applicable{background:#fafafa;color:#999}
td.best{outline:2px solid #1b5e20;outline-offset:-2px;font-weight:700}
.key span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #ccc;font-size:12px}
.hide{display:none}details.columns{margin:6px 0 8px;font-size:12px}details.columns label{margin-right:10px;white-space:nowrap}
"""

JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = !th.classList.contains('asc');
    table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
    th.classList.add(asc ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
      var nx = parseFloat(x), ny = parseFloat(y);
      if (x === '' && y !== '') return 1; if (y === '' && x !== '') return -1;
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
document.querySelectorAll('details.columns input').forEach(function(box){
  box.addEventListener('change', function(){
    document.querySelectorAll('#leaderboard [data-c="' + box.value + '"]').forEach(function(cell){
      cell.classList.toggle('hide', !box.checked);
    });
  });
});
(function(){  // the 1400 px check (scripts/check_html.py): elements past the viewport's right edge, outside
  var w = document.documentElement.clientWidth, n = 0, first = '';  // the scrolling .wrap (which is itself counted)
  document.querySelectorAll('body *').forEach(function(e){
    if (e.parentElement && e.parentElement.closest('.wrap')) return;
    if (e.getBoundingClientRect().right > w + 0.5) { n++; first = first || e.tagName + '.' + e.className; }
  });
  document.body.setAttribute('data-overflow', n); document.body.setAttribute('data-overflow-first', first);
})();
var sortBy = location.hash.match(/sort=(-?)(\d+)/);  // e.g. leaderboard.html#sort=6, #sort=-6 descending
if (sortBy) {
  var th = document.querySelectorAll('#leaderboard th')[+sortBy[2]];
  if (th) { th.click(); if (sortBy[1]) th.click(); }
}
"""
VISIBLE = ("model", "corpus", "scheme", "engine", "mitigation", "bits", "ppl", "ppl_ratio", "kl", "verdict", "effect",
           "d_sink", "run_id")  # the full table's columns shown by default (the chooser shows the rest)


def _hidden(column: str) -> str:
    return "" if column in VISIBLE else " hide"


def _cell(column: str, value: Any, link: str | None = None) -> str:
    digits = COLUMNS[column][1]
    text = fmt(value, digits)
    sort = value[0] if isinstance(value, tuple) else value
    sort_key = "" if sort is None or (isinstance(sort, float) and math.isnan(sort)) else str(sort)
    cls = ("t" if digits is None else "") + _hidden(column)
    if column == "verdict" and text in VERDICT_COLORS:
        cls += f" {text}"
    body = html.escape(text)
    if link:
        body = f'<a href="{html.escape(link, quote=True)}">{body}</a>'
    return f'<td class="{cls.strip()}" data-c="{column}" data-v="{html.escape(sort_key)}">{body}</td>'


def _anchor(run_id: str) -> str:
    return "run-" + "".join(ch for ch in str(run_id) if ch.isalnum())


def matrix_html(ms: list[Matrix]) -> str:
    """Per model and corpus: scheme x mitigation cells coloured by verdict, ★ on the best that helps;
    each cell links to its run's row in the full table."""
    parts = []
    for m in ms:
        head = "".join(f"<th>{html.escape(x)}</th>" for x in m.mitigations)
        rows = []
        for scheme in m.schemes:
            base = m.baseline.get(scheme) or {}
            cells = "".join(_matrix_cell(m.cells.get((scheme, mit))) for mit in m.mitigations)
            rows.append(f'<tr><td class="t">{html.escape(scheme)}</td>'
                        f'<td>{html.escape(fmt(_num(base.get("ppl_ratio")), 4))}</td>{cells}</tr>')
        parts.append(f"<h3>{html.escape(m.title)}</h3><table class=\"matrix\"><thead><tr><th class=\"t\">scheme</th>"
                     f"<th>ppl ×ref</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "".join(parts)


def _matrix_cell(cell: Any) -> str:
    if cell is None:
        return '<td class="none"></td>'
    ci = f" [{fmt(cell.ci[0], 3)}, {fmt(cell.ci[1], 3)}]" if cell.ci and cell.verdict != "not-applicable" else ""
    title = f"{cell.verdict}; Δppl {fmt(cell.delta_ppl, 4)}{ci}"
    cls = f"v-{cell.verdict}" + (" best" if cell.best else "")
    return (f'<td class="{cls}" title="{html.escape(title, quote=True)}"><a href="#{_anchor(cell.run_id)}">'
            f"{html.escape(cell_text(cell))}</a></td>")


def ranking_html(rank: list[dict[str, Any]]) -> str:
    """Ranked per model and corpus, real kernels and simulated ones apart (a split row before each part)."""
    head = ("model", "corpus", "rank", "scheme", "bits", "kernels", "ppl", "ppl ×ref", "KL", "best mitigation")
    rows = []
    for r in rank:
        if r["rank"] == 1:
            label = f"{r['model']} · {r['corpus']}: {r['kernels']} kernels"
            rows.append(f'<tr class="split"><td class="t" colspan="{len(head)}">{html.escape(label)}</td></tr>')
        best = f"{r['best_mitigation']} ({fmt(r['best_delta_ppl'], 3)})" if r["best_mitigation"] else ""
        cells = [(r["model"], "t"), (r["corpus"], "t"), (str(r["rank"]), ""), (r["scheme"], "t"), (r["bits"], "t"),
                 (r["kernels"], "t"), (fmt(r["ppl"], 4), ""), (fmt(r["ppl_ratio"], 4), ""), (fmt(r["kl"], 3), ""),
                 (best, "t")]
        tds = "".join(f'<td class="{c}">{html.escape(v)}</td>' for v, c in cells)
        rows.append(f'<tr>{tds}</tr>')
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table id="ranking"><thead><tr>{heads}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def chooser_html() -> str:
    boxes = "".join(f'<label><input type="checkbox" value="{c}"{" checked" if c in VISIBLE else ""}> '
                    f"{html.escape(COLUMNS[c][0])}</label>" for c in COLUMNS)
    return f'<details class="columns"><summary>Columns ({len(VISIBLE)} of {len(COLUMNS)} shown)</summary>{boxes}</details>'


def _key_html() -> str:
    spans = "".join(f'<span class="v-{v}" style="background:{BG[v]}">{v}</span>' for v in BG)
    return f'<p class="key note">Cell colour = verdict: {spans} ★ = the best mitigation that helps.</p>'


BG = {"helps": "#c8e6c9", "hurts": "#ffcdd2", "inconclusive": "#eeeeee", "insufficient-data": "#fff9c4",
      "not-applicable": "#fafafa"}


def full_table_html(frame: Any, links: dict[str, str]) -> str:
    head = "".join(f'<th class="{("t" if COLUMNS[c][1] is None else "") + _hidden(c)}" data-c="{c}">'
                   f"{html.escape(COLUMNS[c][0])}</th>" for c in COLUMNS)
    body = "\n".join(f'<tr id="{_anchor(r["run_id"])}">' + "".join(
        _cell(c, r[c], links.get(r["run_id"]) if c == "run_id" else None) for c in COLUMNS) + "</tr>"
        for r in frame.to_dict(orient="records"))
    return (chooser_html() + f'<div class="wrap"><table class="sortable" id="leaderboard"><thead><tr>{head}</tr>'
            f"</thead><tbody>\n{body}\n</tbody></table></div>")


def to_html(frame: Any, images: dict[str, bytes | None], failures: list[dict[str, Any]],
            skipped: list[str], superseded: int, links: dict[str, str] | None = None,
            notes: Iterable[str] = ()) -> str:
    rows = frame.to_dict(orient="records") if len(frame) else []
    ms, rank = matrices(rows), ranking(rows)
    protocols = "; ".join(sorted(set(frame["protocol"]))) if len(frame) else "no records"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        'style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
        "<title>quantsink leaderboard</title>", f"<style>{CSS}</style></head><body>",
        "<h1>quantsink leaderboard</h1>",
        f'<p class="note">{len(frame)} runs. Protocol: {html.escape(protocols)}.</p>',
        "<h2>Which mitigation helps which scheme</h2>",
        '<p class="note">Each cell: Δppl of the scheme with that mitigation minus the unmitigated scheme, on the '
        "same windows, and (in brackets) the share of the scheme's damage it recovered, -Δppl / (unmitigated ppl - "
        "reference ppl): 100% = back to the reference, comparable across models. Columns are in one order on every "
        "panel. (Paired 95% interval over windows: hover a cell.) helps / hurts only when the "
        "interval clears the measured noise floor; insufficient-data below the minimum number of windows; n/a when "
        "the mitigation changed nothing. ppl ×ref = unmitigated perplexity / reference perplexity.</p>",
        _key_html(), matrix_html(ms) or '<p class="note">No mitigated runs with a verdict in these records.</p>',
        "<h2>Schemes ranked by perplexity ratio</h2>",
        '<p class="note">Unmitigated schemes; bits = weight / activation / KV-cache bits (float parts at the run\'s '
        "dtype); kernels: simulated (fake quantization) or real (a quantization library's kernels), ranked apart.</p>",
        ranking_html(rank),
        "<h2>All runs</h2>",
        '<p class="note">Click a column header to sort; choose columns below; each run id links to its record. '
        "sink = mean attention on key 0 over layers and heads; drain = mean value-state drain; peak = largest "
        "residual-state peak ratio over layers; d_sink = NLL/token with the sink quantized minus kept in full "
        "precision.</p>",
        full_table_html(frame, links or {}),
        _failures_html(failures), _notes_html(skipped, superseded, notes), "<h2>Plots</h2>",
    ]
    for title, png in images.items():
        if png is None:
            parts.append(f'<h3>{html.escape(title)}</h3><p class="note">No data for this plot in these records.</p>')
        else:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><h3>{html.escape(title)}</h3><img alt="{html.escape(title, quote=True)}" '
                         f'src="data:image/png;base64,{data}"></figure>')
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _failures_html(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return ""
    rows = "".join(f'<tr class="fail"><td class="t">{html.escape(_failure_label(f))}</td>'
                   f'<td class="t">{html.escape(str(f.get("error_type", "")))}</td>'
                   f'<td class="t">{html.escape(str(f.get("error", "")))}</td></tr>' for f in failures)
    return (f"<h2>Failed runs ({len(failures)})</h2><p class=\"note\">Recorded as &lt;run_id&gt;.failed; "
            f"the next sweep retries them.</p><table id=\"failed\"><thead><tr><th>run</th><th>error type</th>"
            f"<th>error</th></tr></thead><tbody>{rows}</tbody></table>")


def _notes_html(skipped: list[str], superseded: int, environments: Iterable[str] = ()) -> str:
    notes = [f"environment: {e}" for e in environments] + [f"skipped: {s}" for s in skipped]
    if superseded:
        notes.append(f"{superseded} older record(s) superseded by newer runs of the same row")
    return "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)


# --------------------------------------------------------------------------- entry point


README_START, README_END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"


def update_readme(path: str | Path, markdown: str) -> bool:
    """Replace the text between the leaderboard markers of a README (-> whether it changed)."""
    from quantsink.errors import QuantsinkError
    from quantsink.io import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise QuantsinkError(f"{path}: no '{README_START}' ... '{README_END}' markers to put the table between")
    new = text[:start + len(README_START)] + "\n" + markdown + text[end:]
    if new != text:
        atomic_write_text(path, new)
    return new != text


@dataclass
class Written:
    paths: list[Path] = field(default_factory=list)
    n_records: int = 0
    n_rows: int = 0
    n_failures: int = 0
    n_skipped: int = 0


def read_results(results: str | Path) -> tuple[list[RunRecord], list[str]]:
    """Every valid record; files skipped (invalid, newer schema) are returned and warned about."""
    from quantsink.records.store import iter_records

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = list(iter_records(results))
    records, unusable = usable(records, results)
    skipped = [str(w.message) for w in caught] + unusable
    for message in skipped:
        warnings.warn(message, stacklevel=2)
    return records, skipped


def usable(records: list[RunRecord], results: str | Path) -> tuple[list[RunRecord], list[str]]:
    """The records whose row can be built; each other one (statistics of the wrong shape) is named and
    skipped, so one bad record never costs the report the others."""
    kept, skipped = [], []
    for record in records:
        try:
            row(record)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as err:
            skipped.append(f"skipped {Path(results) / record.run_id}.json: its statistics cannot be read "
                           f"({type(err).__name__}: {str(err)[:80]}); re-run it")
        else:
            kept.append(record)
    return kept, skipped


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string that would start a formula gets a leading "'"."""
    if isinstance(value, tuple):
        value = fmt(value, 6)
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def to_csv(frame: Any) -> str:
    """The leaderboard as CSV; text cells are neutralised against formula injection."""
    return frame.astype(object).map(csv_cell).to_csv(index=False)


def to_matrix_csv(frame: Any) -> str:
    """The scheme x mitigation matrix (the html's and markdown's first view) in long form, one row per cell."""
    import pandas as pd

    rows = matrix_rows(matrices(frame.to_dict(orient="records") if len(frame) else []))
    return to_csv(pd.DataFrame(rows, columns=list(MATRIX_CSV)))


def record_links(results: str | Path, out: str | Path) -> dict[str, str]:
    """run_id -> the record file's path relative to the leaderboard (the html links each row to it)."""
    import os

    root = Path(results)
    return {path.stem: Path(os.path.relpath(path, Path(out))).as_posix() for path in sorted(root.glob("*.json"))}


def check_results(results: str | Path, records: list[Any], failures: list[Any], skipped: list[str]) -> None:
    """A missing or empty results directory is an error: the old leaderboard is kept, nothing is written."""
    from quantsink.errors import QuantsinkError, UsageError

    if not Path(results).is_dir():
        raise UsageError(f"--results {results}: no such directory; nothing written")
    if not records and not failures:
        why = f" ({len(skipped)} files skipped)" if skipped else ""
        raise QuantsinkError(f"--results {results}: no run records{why}; run `quantsink eval` or "
                             f"`quantsink sweep` first (nothing written)")


def write_report(results: str | Path, out: str | Path) -> Written:
    """results/ -> leaderboard.{md,csv,json,html} and leaderboard_matrix.csv in ``out``."""
    from quantsink.io import atomic_write_text
    from quantsink.records.store import check_writable_dir
    from quantsink.records.store import iter_failures

    check_writable_dir(out, "--out")
    records, skipped = read_results(results)
    failures = list(iter_failures(results))
    check_results(results, records, failures, skipped)
    frame, kept, superseded = leaderboard(records)
    notes = environment_notes(kept)
    out = Path(out)
    files = {
        "leaderboard.md": to_markdown(frame, failures, notes),
        "leaderboard.csv": to_csv(frame),
        "leaderboard_matrix.csv": to_matrix_csv(frame),
        "leaderboard.json": to_json(frame, failures, skipped, superseded, notes),
        "leaderboard.html": to_html(frame, plots(frame, kept), failures, skipped, superseded,
                                    record_links(results, out), notes),
    }
    written = Written(n_records=len(records), n_rows=len(frame), n_failures=len(failures), n_skipped=len(skipped))
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.paths.append(out / name)
    return written
