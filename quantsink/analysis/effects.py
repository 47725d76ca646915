"""Does the mitigation help?  ``mitigation_effect`` and ``d_sink``: pure functions over stored records.

Both compare two runs of the same scheme over the *same* windows (same scored
tokens, same order), paired per window (statistics in ``paired``):

* ``mitigation_effect`` (runs with a mitigation): mitigated minus unmitigated
  (``S`` with ``--mitigation none``): ``delta_ppl`` with its paired t 95% interval
  over windows, ``delta_kl`` (mean KL per scored token) with its interval,
  ``delta_top1``, and ``verdict`` (``paired.verdict``): insufficient-data below
  ``RunConfig.min_windows`` windows, not-applicable when the mitigation changed
  nothing, else helps / hurts only when the interval clears the unmitigated
  run's measured noise floor (``RunRecord.noise_floor``), inconclusive otherwise.
* ``d_sink`` (schemes that quantize tokens): the damage quantizing the sink does,
  ``NLL/token(S) - NLL/token(S + sink-fp)`` in nats per scored token, with its
  interval; ``sink-fp`` keeps position 0 (the sink: BOS when the protocol has one,
  else the first token) in full precision.

The runs they pair with are the variant runs ``plan.plan`` puts in every plan
(``plan.variants``); here they are looked up by run_id among stored records,
never evaluated.  Where every window begins with the same sink token (a BOS, or
a prepended sink token), ``shared_sink`` says so: the sink's quantization error
is common to all windows, which therefore do not sample it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from quantsink.errors import QuantsinkError
from quantsink.measure.paired import MIN_WINDOWS, paired_t, ppl_delta, verdict
from quantsink.pipeline.plan import SINK_FP, run_id_for, variant, variants
from quantsink.records.schema import RunRecord

D_SINK = ("NLL per scored token with the scheme applied everywhere minus with the sink position "
          "(position 0) kept in full precision by sink-fp; nats/token")
RULE = ("insufficient-data below min_windows windows; not-applicable when the mitigation changed nothing; "
        "else helps if the delta_ppl interval lies below -noise_floor, hurts if above +noise_floor, "
        "inconclusive otherwise")
SHARED_SINK = ("every window begins with the same sink token ({token}): its quantization error is shared by all "
               "windows, so the windows do not sample it and the interval covers only the other tokens' variation")
Lookup = Callable[[str], "RunRecord | None"]  # run_id -> stored record


@dataclass(frozen=True)
class Effects:
    """What a record's variant runs say about it (None where the record has no such effect)."""

    mitigation_effect: dict[str, Any] | None = None
    d_sink: dict[str, Any] | None = None
    missing: tuple[str, ...] = ()  # run_ids of variant runs not found

    def to_dict(self) -> dict[str, Any]:
        return {"mitigation_effect": self.mitigation_effect, "d_sink": self.d_sink, "missing": list(self.missing)}


def pairs(a: RunRecord, b: RunRecord) -> bool:
    """Whether two runs scored the same windows (so they can be paired window by window)."""
    return a.candidate.scored_per_window == b.candidate.scored_per_window


def variant_id(record: RunRecord, mitigation: str) -> str:
    """The run_id of ``record``'s variant with ``mitigation`` (its own run_id for its own mitigation)."""
    if mitigation == record.config.mitigation:
        return record.run_id
    return run_id_for(variant(record.config, mitigation), record.model.sha256, record.corpus.sha256)


def effects(record: RunRecord, lookup: Lookup) -> Effects:
    """``mitigation_effect`` and ``d_sink`` of ``record`` from the stored records ``lookup`` finds."""
    needed = {m: variant_id(record, m) for m in (record.config.mitigation, *variants(record.config))}
    found = {m: record if rid == record.run_id else lookup(rid) for m, rid in needed.items()}
    missing = tuple(rid for m, rid in needed.items() if found[m] is None)
    effect = sink = None
    if record.config.mitigation != "none" and found.get("none") is not None:
        effect = mitigation_effect(_paired(found["none"], record), record, min_windows=record.config.min_windows)
    if found.get("none") is not None and found.get(SINK_FP) is not None:
        sink = d_sink(found["none"], _paired(found[SINK_FP], found["none"]))
    return Effects(effect, sink, missing)


def _paired(a: RunRecord, b: RunRecord) -> RunRecord:
    if not pairs(a, b):
        raise QuantsinkError(f"runs {a.run_id} and {b.run_id} score different windows and cannot be "
                             f"paired; delete the stale record and re-run")
    return a


def _summary(record: RunRecord) -> dict[str, Any]:
    cand = record.candidate
    return {"run_id": record.run_id, "mitigation": record.config.mitigation, "ppl": cand.ppl,
            "nll_per_token": cand.nll_per_token, "bits_per_byte": cand.bits_per_byte, "kl": cand.kl,
            "top1_agreement": cand.top1_agreement}


def not_applicable(base: RunRecord, mitigated: RunRecord) -> str | None:
    """Why the mitigated run is a no-op (None when it changed something): every mitigation
    recorded ``applied: False``, or its per-window NLL and KL equal the unmitigated run's bit for bit."""
    notes = [m.applied for m in mitigated.mitigation]
    if notes and all(n.get("applied") is False for n in notes):
        return "; ".join(str(n.get("why", "not applied")) for n in notes)
    b, m = base.candidate, mitigated.candidate
    if b.nll_per_window == m.nll_per_window and b.kl_per_window == m.kl_per_window:
        return "the mitigated pass equals the unmitigated one bit for bit"
    return None


def shared_sink(record: RunRecord) -> str | None:
    """The note that the sink is one token shared by all windows (BOS or a prepended sink token), else None."""
    token = record.protocol.bos_token_id
    for m in record.mitigation:
        if m.applied.get("applied") is True and "token_id" in m.applied:
            token = m.applied["token_id"]
    return None if token is None else SHARED_SINK.format(token=f"id {token}")


def floor_of(base: RunRecord) -> float:
    """The unmitigated run's noise floor in nats/token (0 when it has none recorded)."""
    return float((base.noise_floor or {}).get("nats_per_token") or 0.0)


def paired_delta(a: RunRecord, b: RunRecord, *, floor: float, min_windows: int) -> dict[str, Any]:
    """B minus A, paired over windows (lower ppl / KL is better): the deltas, their intervals and the verdict
    against ``floor`` (nats/token).  KL and top-1 deltas are None where a run lacks them."""
    ca, cb, n = a.candidate, b.candidate, a.candidate.scored_per_window
    nll = paired_t(ca.nll_per_window, cb.nll_per_window, n)
    kl = paired_t(ca.kl_per_window, cb.kl_per_window, n) if ca.kl_per_window and cb.kl_per_window else None
    top1 = None if ca.top1_agreement is None or cb.top1_agreement is None else cb.top1_agreement - ca.top1_agreement
    return {"delta_ppl": ppl_delta(ca.nll_per_window, n, nll["delta"]),
            "ci95": [ppl_delta(ca.nll_per_window, n, x) for x in nll["ci"]],
            "delta_nll_per_token": nll["delta"], "delta_nll_ci95": nll["ci"],
            "delta_kl": kl["delta"] if kl else None, "delta_kl_ci95": kl["ci"] if kl else None,
            "delta_top1": top1, "verdict": verdict(nll["ci"], nll["n_windows"], floor=floor, min_windows=min_windows),
            "noise_floor_nats": floor, "n_windows": nll["n_windows"], "min_windows": min_windows,
            "confidence": nll["confidence"], "method": nll["method"]}


def mitigation_effect(base: RunRecord, mitigated: RunRecord, *, min_windows: int = MIN_WINDOWS) -> dict[str, Any]:
    """Mitigated minus unmitigated, paired over windows (lower ppl / KL is better), with its verdict."""
    floor, why = floor_of(base), not_applicable(base, mitigated)
    effect = {"baseline": _summary(base), **paired_delta(base, mitigated, floor=floor, min_windows=min_windows)}
    if why:
        effect["verdict"] = "not-applicable"
    return {**effect, "not_applicable": why, "rule": RULE,
            "noise_floor_ppl": ppl_delta(base.candidate.nll_per_window, base.candidate.scored_per_window, floor),
            "noise_floor_measured": base.noise_floor is not None, "shared_sink": shared_sink(mitigated)}


def d_sink(full: RunRecord, sink_fp: RunRecord) -> dict[str, Any]:
    """``NLL/token(full) - NLL/token(sink-fp)`` with its paired t interval."""
    f, s = full.candidate, sink_fp.candidate
    res = paired_t(s.nll_per_window, f.nll_per_window, f.scored_per_window)
    return {"nats_per_token": res["delta"], "ci95": res["ci"], "full_ppl": f.ppl, "sink_fp_ppl": s.ppl,
            "full_run_id": full.run_id, "sink_fp_run_id": sink_fp.run_id, "n_windows": res["n_windows"],
            "confidence": res["confidence"], "method": res["method"], "shared_sink": shared_sink(full),
            "definition": D_SINK}
