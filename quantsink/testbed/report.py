"""The probe history as CSV and as plots (matplotlib, headless)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

LAYER_KEYS = ("attn_sink", "dormant_share", "active_share", "value_norm_sink", "value_norm_others",
              "drain_norm_sink", "drain_norm_others", "residual_norm_sink", "residual_norm_others")


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """One history row -> flat columns: ``attn_sink_L0H0``, ``residual_norm_sink_L0``, ..."""
    flat = {k: v for k, v in row.items() if k != "layers"}
    for i, layer in enumerate(row["layers"]):
        for key in LAYER_KEYS:
            value = layer[key]
            if isinstance(value, list):
                flat.update({f"{key}_L{i}H{h}": v for h, v in enumerate(value)})
            else:
                flat[f"{key}_L{i}"] = value
    return flat


def history_csv(history: list[dict[str, Any]]) -> str:
    rows = [flat_row(r) for r in history]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["step"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _mean(values: Any) -> float:
    return sum(values) / len(values) if isinstance(values, list) else values


def _series(history: list[dict[str, Any]], layer: int, key: str) -> list[float]:
    return [_mean(row["layers"][layer][key]) for row in history]


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Four panels over steps: loss, Attn_<s> per layer, value drain, residual peak (sink solid, others dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for key in ("loss", "markov_loss", "backcopy_loss"):
        axes[0].plot(steps, [row[key] for row in history], label=key)
    panels = ((axes[1], ("attn_sink",), "Attn_<s> (non-trigger queries)"),
              (axes[2], ("value_norm_sink", "value_norm_others"), "||v||: <s> (solid) vs others (dashed)"),
              (axes[3], ("residual_norm_sink", "residual_norm_others"), "||h||: <s> (solid) vs others (dashed)"))
    for layer in range(len(history[0]["layers"])):
        color = f"C{layer}"
        for ax, keys, _ in panels:
            for key, style in zip(keys, ("-", "--")):
                ax.plot(steps, _series(history, layer, key), style, color=color,
                        label=f"layer {layer}" if style == "-" else None)
    axes[0].set_title("loss (nats/token)")
    for ax, _, name in panels:
        ax.set_title(name)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


#: the testbed's practical-significance margin: a change of perplexity smaller than 0.5% is no effect
PRACTICAL_MARGIN = 0.005


def practical_verdict(ci_nats: Any, margin: float = PRACTICAL_MARGIN) -> str:
    """A paired 95% interval of a change in NLL/token (``b - a``, lower is better) -> a verdict with a margin.

    ``m = log(1 + margin)`` nats/token is a ``margin`` relative change of perplexity.  ``helps``: the
    whole interval is below ``-m``; ``hurts``: above ``+m``; ``no practical effect``: inside ``[-m, m]``;
    else ``inconclusive`` (the interval straddles a margin).
    """
    import math

    low, high = float(ci_nats[0]), float(ci_nats[1])
    m = math.log1p(margin)
    rules = ((high < -m, "helps"), (low > m, "hurts"), (-m <= low and high <= m, "no practical effect"))
    return next((name for hit, name in rules if hit), "inconclusive")


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max over seeds (NaNs dropped; sd 0 for one value)."""
    import statistics

    kept = [v for v in values if v == v]
    if not kept:
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    sd = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return {"mean": statistics.fmean(kept), "sd": sd, "min": min(kept), "max": max(kept), "n": len(kept)}
