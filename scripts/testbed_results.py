"""Collect the remedies lab's Bigram-Backcopy runs (and their quantization rows) into results/testbed/.

Usage: python scripts/testbed_results.py RUNS_DIR QUANT_ROWS.jsonl OUT_DIR
Runs are grouped by (layers, attention) over seeds.  Writes OUT_DIR/lab-<metric>.png (each metric over
training steps: the mean over seeds per variant, the band from min to max), OUT_DIR/lab-summary.json
(per-run final probes, per-variant spreads, every quantization row without its per-window NLLs) and
prints the markdown tables for results/testbed.md.

Quantization verdicts use the testbed's practical margin (``quantsink.testbed.report.practical_verdict``,
0.5% of perplexity) on the paired 95% t interval over the held-out windows of the change in NLL/token:
damage = candidate vs the float model; sink-fp = scheme + sink-fp vs the scheme alone.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from quantsink.measure.paired import paired_t
from quantsink.testbed.report import PRACTICAL_MARGIN, practical_verdict, spread

VARIANTS = ["softmax", "relu", "softmax1", "sink-logit", "gated", "softpick"]

# metric -> (label, value of one probe summary or history row); ratios are <s> over the mean of the others
METRICS = {
    "loss": ("loss (nats/token)", lambda f: f["loss"]),
    "markov_loss": ("bigram loss", lambda f: f["markov_loss"]),
    "backcopy_loss": ("backcopy loss", lambda f: f["backcopy_loss"]),
    "attn_sink": ("Attn_<s> (non-trigger queries)", lambda f: f["attn_sink"]),
    "dormant_share": ("dormant share of queries (>= 0.89 on <s>)", lambda f: f["dormant_share"]),
    "value_ratio": ("||v_<s>|| / mean ||v_others||", lambda f: f["value_norm_sink"] / f["value_norm_others"]),
    "residual_ratio": ("||h_<s>|| / mean ||h_others|| (layer 0)",
                       lambda f: f["residual_norm_sink"] / f["residual_norm_others"]),
}

# the paper's 1-layer numbers (Guo et al. 2024, batch 512, softmax + Adam at 1k steps; ReLU attention: no sink)
PAPER = {"softmax": {"attn_sink": "0.779", "value_ratio": "3.51 vs 18-27", "residual_sink": "27"},
         "relu": {"attn_sink": "~0 (no sink)"}}


def flat(row: dict) -> dict:
    """A history row -> the summary keys (layer 0 only: the lab's models have one layer)."""
    layer = row["layers"][0]
    mean = lambda v: sum(v) / len(v) if isinstance(v, list) else v  # noqa: E731
    return {"loss": row["loss"], "markov_loss": row["markov_loss"], "backcopy_loss": row["backcopy_loss"],
            **{k: mean(layer[k]) for k in ("attn_sink", "dormant_share", "value_norm_sink", "value_norm_others")},
            "residual_norm_sink": layer["residual_norm_sink"], "residual_norm_others": layer["residual_norm_others"]}


def load_runs(runs: Path) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in sorted(runs.glob("*/testbed.json")):
        data = json.loads(record.read_text())
        c = data["config"]
        data["history"] = json.loads((record.parent / "history.json").read_text())
        data["name"], data["dir"] = record.parent.name, str(record.parent)
        groups[f"{c['layers']}L-{c['attention']}"].append(data)
    order = {v: i for i, v in enumerate(VARIANTS)}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].split("-")[0], order.get(kv[0].split("-", 1)[1], 99))))


def cell(values: list[float], digits: int = 3) -> str:
    s = spread(values)
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def probe_table(groups: dict[str, list[dict]]) -> str:
    head = ("| variant | seeds | loss | bigram loss | backcopy loss | Attn on `<s>` | dormant share | "
            "value norm `<s>` / others | residual norm `<s>` / others (L0) | residual norm of `<s>` | "
            "paper (1L softmax, 1k steps) |")
    lines = [head, "|" + "---|" * 11]
    for name, runs in groups.items():
        finals = [r["final"] for r in runs]
        col = lambda key, d=3: cell([METRICS[key][1](f) for f in finals], d)  # noqa: E731
        paper = PAPER.get(name.split("-", 1)[1], {})
        paper_text = "; ".join(f"{k} {v}" for k, v in paper.items()) or "-"
        lines.append(f"| {name} | {len(runs)} | {col('loss')} | {col('markov_loss')} | {col('backcopy_loss')} | "
                     f"{col('attn_sink')} | {col('dormant_share', 2)} | {col('value_ratio', 2)} | "
                     f"{col('residual_ratio', 2)} | {cell([f['residual_norm_sink'] for f in finals], 1)} | {paper_text} |")
    return "\n".join(lines)


def _nats_ci(a: list[float], b: list[float], n: list[int]) -> list[float]:
    return paired_t(a, b, n)["ci"]


def quant_rows(rows: list[dict], groups: dict[str, list[dict]]) -> dict:
    """(variant, scheme) -> per-seed damage %, sink-fp %, verdicts, dormant heads and woken heads."""
    variant_of = {r["dir"]: name for name, runs in groups.items() for r in runs}
    by = {(r["model"], r["scheme"], r["mitigation"]): r for r in rows}
    table: dict = defaultdict(lambda: defaultdict(list))
    for (model, scheme, mitigation), r in by.items():
        other = by.get((model, scheme, "sink-fp"))
        if mitigation != "none" or model not in variant_of:
            continue
        t = table[(variant_of[model], scheme)]
        t["damage"].append(r["ppl"] / r["ref_ppl"] - 1)
        t["damage_verdict"].append(practical_verdict(_nats_ci(r["ref_nll"], r["nll"], r["scored"])))
        t["dormant_ref"].append(sum(f >= 0.5 for row in r["dormant_ref"] for f in row if f is not None))
        t["woken"].append(len(r["woken"] or []))
        t["share_ref"].append(_mean_share(r["dormant_ref"]))
        t["share_cand"].append(_mean_share(r["dormant_cand"]))
        if other:
            t["sinkfp"].append(other["ppl"] / other["ref_ppl"] - 1)
            t["sinkfp_verdict"].append(practical_verdict(_nats_ci(r["nll"], other["nll"], r["scored"])))
            t["harness_verdict"].append(other["verdict"])
    return table


def _mean_share(table: list) -> float:
    values = [f for row in table for f in row if f is not None]
    return sum(values) / len(values) if values else float("nan")


def counts(verdicts: list[str]) -> str:
    return ", ".join(f"{n}x {v}" for v, n in Counter(verdicts).most_common())


def pct(values: list[float]) -> str:
    s = spread(values)
    return f"{s['mean']:+.3%} [{s['min']:+.3%}, {s['max']:+.3%}]"


def quant_table(table: dict) -> str:
    lines = ["| variant | scheme | ppl change vs float (mean [min, max] over seeds) | damage verdicts | "
             "with sink-fp | sink-fp verdicts (margin) | harness's sink-fp verdicts | dormant query share, float -> "
             "quantized | dormant heads (float) | woken |",
             "|" + "---|" * 10]
    rank = {f"{layers}L-{v}": (layers, i) for layers in range(1, 9) for i, v in enumerate(VARIANTS)}
    for (variant, scheme), t in sorted(table.items(), key=lambda kv: rank.get(kv[0][0], (99, 99))):
        lines.append(f"| {variant} | {scheme} | {pct(t['damage'])} | {counts(t['damage_verdict'])} | "
                     f"{pct(t['sinkfp']) if t['sinkfp'] else '-'} | {counts(t['sinkfp_verdict'])} | "
                     f"{counts(t['harness_verdict'])} | {spread(t['share_ref'])['mean']:.3f} -> "
                     f"{spread(t['share_cand'])['mean']:.3f} | {sum(t['dormant_ref'])} | {sum(t['woken'])} |")
    return "\n".join(lines)


def plot_metrics(groups: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, (label, value) in METRICS.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (name, runs) in enumerate(groups.items()):
            steps = [row["step"] for row in runs[0]["history"]]
            series = [[value(flat(row)) for row in r["history"]] for r in runs if len(r["history"]) == len(steps)]
            per_step = list(zip(*series))
            ax.plot(steps, [sum(v) / len(v) for v in per_step], color=f"C{i}", label=f"{name} ({len(series)} seeds)")
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=f"C{i}", alpha=0.2)
        ax.set_xlabel("step")
        ax.set_title(f"{label}: mean over seeds, band min-max", fontsize=10)
        if key.endswith("ratio"):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"lab-{key}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    runs_dir, rows_file, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    groups = load_runs(runs_dir)
    plot_metrics(groups, out)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()] \
        if rows_file.is_file() else []
    table = quant_rows(rows, groups)
    light = [{k: v for k, v in r.items() if k not in ("ref_nll", "nll", "scored")} for r in rows]
    summary = {"margin_ppl": PRACTICAL_MARGIN,
               "runs": {r["name"]: {"config": r["config"], "final": r["final"]} for g in groups.values() for r in g},
               "spreads": {name: {k: spread([v(r["final"]) for r in g]) for k, (_, v) in METRICS.items()}
                           for name, g in groups.items()},
               "quantization": light}
    (out / "lab-summary.json").write_text(json.dumps(summary, indent=1))
    print(probe_table(groups))
    print()
    print(quant_table(table) if rows else "(no quantization rows)")


if __name__ == "__main__":
    main()
