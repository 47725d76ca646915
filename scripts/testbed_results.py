"""Collect trained Bigram-Backcopy runs (and their quantization rows) into results/testbed/.

Usage: python scripts/testbed_results.py RUNS_DIR QUANT_ROWS.jsonl OUT_DIR
Writes OUT_DIR/<run>.png (each run's dynamics), OUT_DIR/<run>.csv (its probe history),
OUT_DIR/compare.png (the runs side by side), OUT_DIR/summary.json (final probes + quantization
rows) and prints the markdown tables for results/testbed.md.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def load_runs(runs: Path) -> dict[str, dict]:
    found = {}
    for record in sorted(runs.glob("*/testbed.json")):
        name = record.parent.name
        found[name] = {**json.loads(record.read_text()),
                       "history": json.loads((record.parent / "history.json").read_text())}
    return found


def compare_plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, run) in enumerate(runs.items()):
        h = run["history"]
        steps = [r["step"] for r in h]
        best = [max(sum(l["attn_sink"]) / len(l["attn_sink"]) for l in r["layers"]) for r in h]
        ratio = [min(sum(l["value_norm_sink"]) / max(sum(l["value_norm_others"]), 1e-9) for l in r["layers"])
                 for r in h]
        peak = [r["layers"][0]["residual_norm_sink"] / r["layers"][0]["residual_norm_others"] for r in h]
        for ax, ys in zip(axes, (best, ratio, peak)):
            ax.plot(steps, ys, color=f"C{i}", label=name)
    titles = ("Attn_<s> (non-trigger queries), best layer", "||v_<s>|| / mean ||v_others||, lowest layer",
              "||h_<s>|| / mean ||h_others||, layer 0")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def dynamics_table(runs: dict[str, dict]) -> str:
    lines = ["| run | steps x batch | loss (bigram / backcopy) | Attn_<s> (layer) | dormant share | "
             "value norm <s> vs others | W_O v norm <s> vs others | layer-0 residual <s> vs others |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        c, f = run["config"], run["final"]
        lines.append(f"| {name} | {c['steps']} x {c['batch']} | {f['loss']:.3f} ({f['markov_loss']:.3f} / "
                     f"{f['backcopy_loss']:.3f}) | {f['attn_sink']:.3f} (L{f['sink_layer']}) | "
                     f"{f['dormant_share']:.2f} | {f['value_norm_sink']:.2f} vs {f['value_norm_others']:.2f} | "
                     f"{f['drain_norm_sink']:.2f} vs {f['drain_norm_others']:.2f} | "
                     f"{f['residual_norm_sink']:.1f} vs {f['residual_norm_others']:.1f} |")
    return "\n".join(lines)


def layer_table(runs: dict[str, dict]) -> str:
    lines = ["| run | layer | Attn_<s> | dormant share | value norm <s> vs others | residual <s> vs others |",
             "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for i, layer in enumerate(run["history"][-1]["layers"]):
            mean = lambda key: sum(layer[key]) / len(layer[key])  # noqa: E731
            lines.append(f"| {name} | {i} | {mean('attn_sink'):.3f} | {mean('dormant_share'):.2f} | "
                         f"{mean('value_norm_sink'):.2f} vs {mean('value_norm_others'):.2f} | "
                         f"{layer['residual_norm_sink']:.1f} vs {layer['residual_norm_others']:.1f} |")
    return "\n".join(lines)


def quant_table(rows: list[dict]) -> str:
    by = {(r["model"], r["scheme"], r["mitigation"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    head = "| model | float ppl | " + " | ".join(f"{s} (+sink-fp)" for s in schemes) + " |"
    lines = [head, "|" + "---|" * (2 + len(schemes))]
    for m in models:
        ref = next(r["ref_ppl"] for r in rows if r["model"] == m)
        cells = []
        for s in schemes:
            a, b = by.get((m, s, "none")), by.get((m, s, "sink-fp"))
            cell = f"{(a['ppl'] / ref - 1):+.3%}" if a else "-"
            if b:
                cell += f" ({(b['ppl'] / ref - 1):+.3%}, {b['verdict']})"
            cells.append(cell)
        lines.append(f"| {Path(m).name} | {ref:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    runs_dir, rows_file, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(runs_dir)
    for name in runs:
        shutil.copy(runs_dir / name / "dynamics.png", out / f"{name}.png")
        shutil.copy(runs_dir / name / "history.csv", out / f"{name}.csv")
    compare_plot(runs, out / "compare.png")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()] \
        if rows_file.is_file() else []
    summary = {"runs": {n: {"config": r["config"], "final": r["final"]} for n, r in runs.items()}, "quantization": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(dynamics_table(runs))
    print()
    print(layer_table(runs))
    print()
    print(quant_table(rows) if rows else "(no quantization rows)")


if __name__ == "__main__":
    main()
