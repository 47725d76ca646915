"""The leaderboard's figures (matplotlib, PNG bytes): perplexity against bits, before / after a mitigation,
residual-state peak profiles, woken heads, verdicts; at most ``PLOT_GROUPS`` (model, corpus) groups."""

from __future__ import annotations

import io
import math
from typing import Any

from quantsink.records.schema import RunRecord
from quantsink.report.rows import VERDICT_COLORS, head_table, peak_profile, record_side, row, woken_heads


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
        after = peak_profile(record_side(record, "candidate"))
        if r["mitigation"] == "none" and any(v is not None for v in after):
            panels.setdefault((r["model"], r["corpus"]), []).append(
                (r["scheme"], peak_profile(record_side(record, "reference")), after))
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
        shape = head_table(record, "reference", "sink_score")
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
