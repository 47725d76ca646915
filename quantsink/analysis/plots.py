"""PNG plots of extreme-token statistics (matplotlib, headless).

Each function takes the JSON-ready stats of :func:`quantsink.stats.summarize`
(``reference`` and optionally ``candidate``) and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(rows: list[list[float | None]] | None) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows or []], dtype=float)


def residual_profile(sides: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Per layer: token 0's residual norm and the median of the others, log scale, one line pair per side."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = [("tab:red", "tab:blue"), ("tab:orange", "tab:cyan"), ("tab:purple", "tab:green")]
    for i, (label, stats) in enumerate(sides.items()):
        sink, median = colors[i % 3]
        style = "-" if i == 0 else "--"
        layers = [row["layer"] for row in stats["layers"]]
        ax.plot(layers, [row["residual_norm_sink"] for row in stats["layers"]], style, color=sink,
                marker="o", ms=3, label=f"token 0 ({label})")
        ax.plot(layers, [row["residual_norm_median"] for row in stats["layers"]], style, color=median,
                marker="o", ms=3, label=f"median of tokens i>=1 ({label})")
    ax.set_yscale("log")
    ax.set_xlabel("layer (residual stream after the block)")
    ax.set_ylabel("||h|| (mean over stats windows)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def head_heatmaps(sides: dict[str, dict[str, Any]], key: str, path: Path, title: str,
                  vmax: float | None = None) -> Path:
    """Layer x head heatmap of ``heads[key]`` for each side, plus the difference when there are two."""
    plt = _pyplot()
    tables = {label: _table(stats["heads"][key]) for label, stats in sides.items()}
    panels = list(tables.items())
    if len(panels) == 2:
        (a, ta), (b, tb) = panels
        panels.append((f"{b} - {a}", tb - ta))
    shared = vmax or max(float(np.nanmax(t)) for t in tables.values())  # one scale for every side
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 6), squeeze=False)
    for i, (ax, (label, table)) in enumerate(zip(axes[0], panels)):
        diff = i == 2
        limit = np.nanmax(np.abs(table)) if diff else shared
        image = ax.imshow(table, aspect="auto", cmap="RdBu_r" if diff else "viridis",
                          vmin=-limit if diff else 0, vmax=limit or 1, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("KV head" if key == "value_drain" else "head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(table.shape[1]))
        fig.colorbar(image, ax=ax, fraction=0.08)
    fig.suptitle(title)
    return _save(fig, path)


def attention_maps(maps: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """Attention probabilities of one head on the first stats window (top-left crop), side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.6 * len(maps), 4.4), squeeze=False)
    for ax, (label, grid) in zip(axes[0], maps.items()):
        shown = np.where(np.tril(np.ones_like(grid)) > 0, grid, np.nan)
        image = ax.imshow(np.power(shown, 0.5), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        bar = fig.colorbar(image, ax=ax, fraction=0.046)
        bar.set_label("sqrt(attention)")
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
