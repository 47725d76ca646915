"""``quantsink eval``: the planned runs of one config (it and the variant runs its effects pair with)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..config import RunConfig
from .common import RichProgress, app, friendly, out, progress_enabled, quiet, with_config_options


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _title(record: Any, label: str) -> str:
    proto = record.protocol
    return (f"{record.model.name} on {record.corpus.name}: {label}\n"
            f"{proto.n_windows} windows x {proto.window} tokens, stride {proto.stride}, "
            f"BOS {proto.bos}, {proto.scored_tokens} scored tokens, {proto.dtype}")


def _scheme_label(record: Any) -> str:
    return record.scheme.spec + (" (simulated)" if record.scheme.simulated else "")


def result_table(record: Any, effects: Any) -> Table:
    """Reference vs candidate; with a mitigation effect, the unmitigated run beside them."""
    if effects.mitigation_effect is not None:
        return effect_table(record, effects)
    ref, cand = record.reference, record.candidate
    table = Table(title=_title(record, _scheme_label(record)), title_justify="left")
    for column in ("metric", "reference", "candidate", "delta"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, name in (("ppl", "perplexity"), ("bits_per_byte", "bits per byte")):
        a, b = getattr(ref, key), getattr(cand, key)
        table.add_row(name, _fmt(a), _fmt(b), f"{b - a:+.4g} ({(b - a) / a:+.2%})")
    table.add_row("KL(ref || cand) / token", "0", _fmt(cand.kl), "")
    table.add_row("top-1 agreement", "1", _fmt(cand.top1_agreement), "")
    for row in lm_eval_rows(record):
        table.add_row(*row)
    _d_sink_row(table, effects, columns=4)
    if record.noise_floor:
        draws = [d["perturbation"] for d in record.noise_floor.get("draws", ())]
        table.add_row("noise margin (ppl)", "", _fmt(record.noise_floor["ppl"]), ", ".join(draws))
    return table


def lm_eval_rows(record: Any) -> list[tuple[str, str, str, str]]:
    rows = []
    for task, got in (record.candidate.lm_eval or {}).items():
        ref_task = (record.reference.lm_eval or {}).get(task, {})
        for key in ("word_perplexity", "bits_per_byte", "acc", "acc_norm"):
            if key in got and key in ref_task:
                delta = got[key] - ref_task[key]
                rows.append((f"lm-eval {task} {key}", _fmt(ref_task[key]), _fmt(got[key]),
                             f"{delta:+.4g} ({delta / ref_task[key]:+.2%})" if ref_task[key] else f"{delta:+.4g}"))
    return rows


def _d_sink_row(table: Table, effects: Any, columns: int) -> None:
    ds = effects.d_sink
    if ds is not None:
        cells = ["d_sink (nats/token)", "", f"{ds['nats_per_token']:+.4g}",
                 f"95% CI [{ds['ci95'][0]:+.3g}, {ds['ci95'][1]:+.3g}]"]
        table.add_row(*cells, *[""] * (columns - len(cells)))


def effect_table(record: Any, effects: Any) -> Table:
    """Reference / scheme / scheme + mitigation side by side, with the verdict and d_sink."""
    ref, cand, eff = record.reference, record.candidate, effects.mitigation_effect
    base, mitigation = eff["baseline"], record.config.mitigation
    table = Table(title=_title(record, f"{_scheme_label(record)} + {mitigation}"), title_justify="left")
    for column in ("metric", "reference", _scheme_label(record), f"+ {mitigation}", "delta (mitigation)"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    lo, hi = eff["ci95"]
    table.add_row("perplexity", f"{ref.ppl:.4g}", f"{base['ppl']:.4g}", f"{cand.ppl:.4g}",
                  f"{eff['delta_ppl']:+.4g} [{lo:+.3g}, {hi:+.3g}]")
    table.add_row("bits per byte", f"{ref.bits_per_byte:.4g}", f"{base['bits_per_byte']:.4g}",
                  f"{cand.bits_per_byte:.4g}", "")
    table.add_row("KL(ref || cand) / token", "0", f"{base['kl']:.4g}", f"{cand.kl:.4g}", f"{eff['delta_kl']:+.4g}")
    table.add_row("top-1 agreement", "1", f"{base['top1_agreement']:.4g}", f"{cand.top1_agreement:.4g}",
                  f"{eff['delta_top1']:+.4g}")
    table.add_row("verdict", "", "", "", f"[bold]{eff['verdict']}[/bold]")
    if eff.get("not_applicable"):
        table.add_row("", "", "", "", eff["not_applicable"])
    _d_sink_row(table, effects, columns=5)
    table.caption = (f"95% interval: {eff['method']}, {eff['n_windows']} windows (verdict needs "
                     f"{eff['min_windows']}); noise floor {eff['noise_floor_ppl']:.3g} ppl"
                     + ("" if eff["noise_floor_measured"] else " (not measured)"))
    return table


def plan_table(planned: list[Any], results: str) -> Table:
    """``--dry-run``: every run the command would perform, and whether the store has it."""
    from quantsink.records.store import Store

    store = Store(Path(results))
    table = Table(title=f"{len(planned)} planned runs -> {results}", title_justify="left",
                  caption="variant: a run the requested one's mitigation_effect / d_sink pair with; "
                          "reused: its record is in the store")
    for column in ("#", "scheme", "mitigation", "role", "run_id", "status"):
        table.add_column(column)
    for p in planned:
        stored = store.has_valid_record(p.run_id)
        status = "re-run" if stored and p.fresh else "reused" if stored else "to run"
        role = "variant" if p.variant else "requested"
        table.add_row(str(p.index), p.config.scheme, p.config.mitigation, role, p.run_id, status)
    return table


@app.command("eval")
@friendly
@with_config_options
def eval_command(config: RunConfig,
                 json_out: bool = typer.Option(False, "--json", help="Print {record, effects} as JSON on stdout."),
                 no_write: bool = typer.Option(False, "--no-write", help="Do not write any record."),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Print the planned runs; run nothing."),
                 fresh: bool = typer.Option(False, "--fresh", help="Re-run the requested run even when its record "
                                            "is stored (and replace that record); its variant runs are reused.")
                 ) -> None:
    """Quantize the model with a scheme and compare it with the float reference on the same windows.

    With a mitigation, the same scheme without it runs too (mitigation_effect); with a scheme that
    quantizes tokens, also with sink-fp (d_sink).  A run whose record (same run id) is stored is reused,
    not re-run, unless --fresh.  --dry-run lists them."""
    from ..errors import UsageError
    from quantsink.pipeline.plan import plan
    from quantsink.pipeline.execute import invalid_pair, run_config

    quiet()
    why = invalid_pair(config)  # refused in one line before anything is hashed or loaded
    if why:
        raise UsageError(why)
    if dry_run:
        from quantsink.pipeline.preflight import preflight

        preflight(config)  # everything a real run would refuse on its input
        out.print(plan_table(plan([config], fresh=fresh), config.results))
        return
    reused: list[str] = []
    with RichProgress(enabled=progress_enabled(json_out)) as progress:
        record, found = run_config(config, progress=progress, write=not no_write, fresh=fresh,
                                   on_reuse=lambda p, stored: reused.append(reused_line(p, stored)))
    if not no_write and record.candidate.lm_eval:
        from quantsink.pipeline.lmeval import write_results

        reused += [f"lm-eval results: {path}" for path in write_results(record, config.results)]
    _show(record, found, json_out, None if no_write else config.results, reused)


def reused_line(planned: Any, stored: Any) -> str:
    """``reused the stored record <id> (...)``: the requested run's line says how to re-run it."""
    c = planned.config
    what = f"{'variant ' if planned.variant else ''}{c.scheme} + {c.mitigation}, written {stored.created_at}"
    return f"reused the stored record {planned.run_id} ({what})" + ("" if planned.variant else "; --fresh re-runs it")


def _show(record: Any, found: Any, json_out: bool, results: str | None, reused: list[str]) -> None:
    if json_out:
        data = {"record": record.to_dict(), "effects": found.to_dict(), "reused": reused}
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
        return
    for line in reused:
        out.print(line, highlight=False, soft_wrap=True)
    out.print(result_table(record, found))
    cached = " (reference from cache)" if record.reference.cached else ""
    out.print(f"candidate pass {record.timing['candidate_s']:.1f} s, "
              f"{record.timing['candidate_tokens_per_s']:.0f} tokens/s{cached}")
    if results is not None:
        out.print(record_line(Path(results) / f"{record.run_id}.json"), highlight=False, soft_wrap=True)
    hint = more_evidence(record, found)
    if hint:
        out.print(hint, highlight=False, soft_wrap=True)


UNDECIDED = ("inconclusive", "insufficient-data", "within-noise")  # verdicts more windows can change


def more_evidence(record: Any, found: Any) -> str | None:
    """How to ask for more evidence when the verdict is undecided: 4x the tokens halves a paired interval."""
    effect = found.mitigation_effect
    if not effect or effect.get("verdict") not in UNDECIDED:
        return None
    c = record.config
    return (f"more evidence: --max-tokens {4 * c.max_tokens} ({4 * record.protocol.n_windows} windows of "
            f"{c.window}) halves the interval; --corpus python-code or file:PATH measures another domain")


def record_line(path: Path) -> str:
    """``record: PATH``, unless PATH holds a newer quantsink's record of the run (kept, this one not written)."""
    from quantsink.records.store import Store

    if Store(path.parent).status(path.stem) == "newer":
        return f"record: not written; {path} is a newer quantsink's record of this run (kept)"
    return f"record: {path}"
