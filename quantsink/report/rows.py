"""The leaderboard's rows: one per full identity, every derived number computed from the records.

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

import html
import json
import math
import warnings
from typing import Any, Iterable

from quantsink.analysis.compare import identity_key, settings_label, varying_settings
from quantsink.analysis.effects import Effects, effects
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


def as_number(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ci(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(as_number(v) is not None for v in value):
        return float(value[0]), float(value[1])
    return None


def _mean(matrix: list[list[float | None]] | None) -> float | None:
    values = [v for row in matrix or [] for v in row if as_number(v) is not None]
    return sum(values) / len(values) if values else None


def _max(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def record_side(record: RunRecord, name: str) -> dict[str, Any] | None:
    """``stats.reference`` / ``stats.candidate`` (None without stats)."""
    return None if record.stats is None else getattr(record.stats, name)


def head_table(record: RunRecord, name: str, table: str) -> Any:
    side = record_side(record, name)
    return None if side is None else side["heads"].get(table)


def peak_profile(side: dict[str, Any] | None) -> list[float | None]:
    """Per-layer residual-state peak ratio of ``stats.reference`` / ``stats.candidate``."""
    return [as_number(layer.get("residual_peak_ratio")) for layer in (side or {}).get("layers", [])]


def bits_label(record: RunRecord) -> str:
    """``W8A8KV32``: weight / activation / KV-cache bits, float parts at the run's dtype."""
    fallback = DTYPE_BITS.get(record.protocol.dtype, 32)
    widths = record.scheme.bit_widths
    return "".join(f"{tag}{widths.get(key) or fallback}"
                   for tag, key in (("W", "weights"), ("A", "activations"), ("KV", "kv")))


def woken_heads(record: RunRecord) -> list[tuple[int, int]] | None:
    """(layer, head) pairs woken by the candidate (``stats.changes.woken``: dormant in the reference,
    active after); None when the record has no attention statistics on both sides (unknown, not zero)."""
    if record.stats is None or record.stats.changes is None or head_table(record, "reference", "dormant_fraction") is None:
        return None
    return [_pair(name) for name in record.stats.changes["woken"]]


def _pair(name: str) -> tuple[int, int]:
    layer, head = name[1:].split("H", 1)  # "L20H5"
    return int(layer), int(head)


def kl_tail(percentiles: dict[str, float] | None) -> dict[str, float | None]:
    """The row's per-token KL percentiles (None where the record kept none)."""
    p = percentiles or {}
    return {"kl_p99": as_number(p.get("p99")), "kl_p999": as_number(p.get("p99.9")), "kl_max": as_number(p.get("max"))}


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
    bpb_ref, bpb = as_number(ref.bits_per_byte), as_number(cand.bits_per_byte)
    return {
        "model": record.model.name, "corpus": record.corpus.name, "settings": settings_label(record, settings),
        "scheme": scheme.spec, "engine": record.config.engine,
        "mitigation": record.config.mitigation, "bits": bits_label(record), "w_bits": as_number(scheme.bits),
        "ppl_ref": as_number(ref.ppl), "ppl": as_number(cand.ppl), "ppl_ratio": _ratio(cand.ppl, ref.ppl),
        "kl": as_number(cand.kl), **kl_tail(cand.kl_percentiles), "top1": as_number(cand.top1_agreement), "bpb": bpb,
        "documents": record.protocol.documents,
        "mde": as_number(effect["mde_ppl"]) if effect and verdict == "inconclusive" else None,
        "delta_bpb": bpb - bpb_ref if bpb is not None and bpb_ref is not None else None,
        "d_sink": as_number(d_sink["nats_per_token"]) if d_sink else None, "d_sink_ci": _ci(d_sink["ci95"]) if d_sink else None,
        "verdict": verdict, "effect": None if no_effect else as_number(effect["delta_ppl"]),
        "effect_ci": None if no_effect else _ci(effect["ci95"]),
        "sink_before": _mean(head_table(record, "reference", "sink_score")),
        "sink_after": _mean(head_table(record, "candidate", "sink_score")),
        "drain_before": _mean(head_table(record, "reference", "value_drain")),
        "drain_after": _mean(head_table(record, "candidate", "value_drain")),
        "heads_woken": None if woken is None else len(woken),
        "peak_before": _max(peak_profile(record_side(record, "reference"))),
        "peak_after": _max(peak_profile(record_side(record, "candidate"))),
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
    return a / b if as_number(a) is not None and as_number(b) else None


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


def failure_label(failure: dict[str, Any]) -> str:
    c = failure.get("config") or {}
    return " · ".join(str(c.get(k, "?")) for k in ("model", "corpus", "scheme", "mitigation"))
