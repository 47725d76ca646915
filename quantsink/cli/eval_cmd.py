"""``quantsink eval``: one planned evaluation (and the variant runs its effects need)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.table import Table

from ..config import RunConfig
from .common import RichProgress, app, err, friendly, out, quiet, with_config_options


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def result_table(record: dict[str, Any]) -> Table:
    if record.get("mitigation_effect"):
        from ..effects import effect_table

        return effect_table(record)
    ref, cand = record["reference"], record["candidate"]
    scheme = record["scheme"]
    label = scheme["spec"] + (" (simulated)" if scheme["simulated"] else "")
    proto = record["protocol"]
    title = (f"{record['model']['name']} on {record['corpus']['name']}: {label}\n"
             f"{proto['n_windows']} windows x {proto['window']} tokens, stride {proto['stride']}, "
             f"BOS {proto['bos']}, {proto['scored_tokens']} scored tokens, {proto['dtype']}")
    table = Table(title=title, title_justify="left")
    for column in ("metric", "reference", "candidate", "delta"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, name in (("ppl", "perplexity"), ("bits_per_byte", "bits per byte")):
        delta = cand[key] - ref[key]
        table.add_row(name, _fmt(ref[key]), _fmt(cand[key]), f"{delta:+.4g} ({delta / ref[key]:+.2%})")
    table.add_row("KL(ref || cand) / token", "0", _fmt(cand.get("kl")), "")
    table.add_row("top-1 agreement", "1", _fmt(cand.get("top1_agreement")), "")
    for task, got in cand.get("lm_eval", {}).items():
        ref_task = ref.get("lm_eval", {}).get(task, {})
        for key in ("word_perplexity", "bits_per_byte", "acc", "acc_norm"):
            if key in got and key in ref_task:
                delta = got[key] - ref_task[key]
                table.add_row(f"lm-eval {task} {key}", _fmt(ref_task[key]), _fmt(got[key]),
                              f"{delta:+.4g} ({delta / ref_task[key]:+.2%})" if ref_task[key] else f"{delta:+.4g}")
    if "d_sink" in record:
        ds = record["d_sink"]
        table.add_row("d_sink (nats/token)", "", f"{ds['nats_per_token']:+.4g}",
                      f"95% CI [{ds['ci95'][0]:+.3g}, {ds['ci95'][1]:+.3g}]")
    if record.get("noise_floor"):
        floor = record["noise_floor"]
        table.add_row("noise floor (ppl)", "", _fmt(floor["ppl"]), floor["perturbation"])
    return table


@app.command("eval")
@friendly
@with_config_options
def eval_command(config: RunConfig,
                 json_out: bool = typer.Option(False, "--json", help="Print the record as JSON on stdout."),
                 no_write: bool = typer.Option(False, "--no-write", help="Do not write the record.")) -> None:
    """Quantize the model with a scheme and compare it with the float reference on the same windows."""
    quiet()
    from ..run import run

    with RichProgress(enabled=not json_out and err.is_terminal) as progress:
        record = run(config, progress=progress, write=not no_write)
    if json_out:
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
        return
    out.print(result_table(record))
    timing = record["timing"]
    cached = " (reference from cache)" if record["reference"]["cached"] else ""
    out.print(f"candidate pass {timing['candidate_s']:.1f} s, "
              f"{timing['candidate_tokens_per_s']:.0f} tokens/s{cached}")
    if "path" in record:
        out.print(f"record: {record['path']}")
