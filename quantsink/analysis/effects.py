"""Does the mitigation help?  ``mitigation_effect`` and ``d_sink``: pure functions over stored records.

Both compare two runs of the same scheme over the *same* windows (same scored
tokens, same order), paired per window (statistics in ``paired``):

* ``mitigation_effect`` (runs with a mitigation): mitigated minus unmitigated
  (``S`` with ``--mitigation none``): ``delta_ppl`` with its paired t 95% interval
  over windows, standard errors clustered by document where the protocol records
  each window's document (``paired.clustered_t``), ``delta_kl`` (mean KL per scored
  token) and ``delta_top1`` with theirs, each side's ppl and top-1 agreement with
  their intervals and its per-token KL percentiles, and ``verdict``
  (``paired.verdict``): insufficient-data below ``RunConfig.min_windows`` windows,
  not-applicable when the mitigation changed nothing, else helps / hurts only when
  the interval clears the unmitigated run's noise margin (``RunRecord.noise_floor``,
  from its float perturbation draws), within-noise when it clears 0 only,
  inconclusive otherwise, beside ``mde_ppl`` (the effect this n finds 80% of the
  time); an inconclusive / within-noise NLL whose KL interval clears the KL margin
  reads lowers-kl / raises-kl; a static scheme's interval carries the spread of the
  effect over its calibration draws (``RunRecord.calibration``, ``calibration_spread``).
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

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from quantsink.errors import QuantsinkError
from quantsink.measure.paired import MIN_WINDOWS, clustered_t, mde, ppl_delta, ratio_t, t_quantile, verdict
from quantsink.pipeline.plan import SINK_FP, run_id_for, variant, variants
from quantsink.records.schema import RunRecord

D_SINK = ("NLL per scored token with the scheme applied everywhere minus with the sink position "
          "(position 0) kept in full precision by sink-fp; nats/token")
RULE = ("insufficient-data below min_windows windows; not-applicable when the mitigation changed nothing; "
        "else helps if the NLL interval (clustered by document) lies below -margin, hurts if above +margin "
        "(margin: the unmitigated run's noise margin), within-noise if it excludes 0 but not the margin, "
        "inconclusive otherwise (with mde_ppl, the effect this n finds 80% of the time); an inconclusive or "
        "within-noise NLL whose KL interval clears the KL margin reads lowers-kl / raises-kl; static schemes: "
        "the intervals carry the effect's standard deviation over calibration draws (added in quadrature)")
KL_READING = {"helps": "lowers-kl", "hurts": "raises-kl"}
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


def clusters_of(record: RunRecord) -> list[int] | None:
    """Each window's document (the documents protocol), so intervals cluster by document; else None."""
    return record.protocol.window_documents


def _summary(record: RunRecord) -> dict[str, Any]:
    """One side: ppl with its interval (clustered by document), KL with its percentiles, top-1 agreement with
    its interval."""
    cand, clusters = record.candidate, clusters_of(record)
    ppl = ratio_t(cand.nll_per_window, cand.scored_per_window, clusters)
    top1 = (ratio_t(cand.top1_per_window, cand.scored_per_window, clusters)
            if cand.top1_per_window is not None else None)
    return {"run_id": record.run_id, "mitigation": record.config.mitigation, "ppl": cand.ppl,
            "ppl_ci95": [math.exp(x) for x in ppl["ci"]],
            "nll_per_token": cand.nll_per_token, "bits_per_byte": cand.bits_per_byte, "kl": cand.kl,
            "kl_percentiles": cand.kl_percentiles, "top1_agreement": cand.top1_agreement,
            "top1_ci95": top1["ci"] if top1 else None}


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
    """The unmitigated run's noise margin in nats/token (0 when it has none recorded)."""
    return float((base.noise_floor or {}).get("nats_per_token") or 0.0)


def kl_floor_of(base: RunRecord) -> float:
    """The unmitigated run's noise margin on the mean KL/token (0 when it has none recorded)."""
    return float((base.noise_floor or {}).get("kl_margin") or 0.0)


def paired_delta(a: RunRecord, b: RunRecord, *, floor: float, min_windows: int, kl_floor: float = 0.0,
                 calibration_sd: float = 0.0, kl_calibration_sd: float = 0.0) -> dict[str, Any]:
    """B minus A, paired over windows with standard errors clustered by document (lower ppl / KL is better):
    the deltas, their intervals, the verdict against ``floor`` (nats/token; KL against ``kl_floor``) and the
    minimum detectable effect.  ``calibration_sd`` (``kl_calibration_sd``): the spread of the effect over
    calibration draws, added in quadrature to the standard error.  KL and top-1 deltas are None where a run
    lacks them."""
    ca, cb, n, clusters = a.candidate, b.candidate, a.candidate.scored_per_window, clusters_of(a)
    nll = widened(clustered_t(ca.nll_per_window, cb.nll_per_window, n, clusters), calibration_sd)
    kl = (widened(clustered_t(ca.kl_per_window, cb.kl_per_window, n, clusters), kl_calibration_sd)
          if ca.kl_per_window and cb.kl_per_window else None)
    top1 = (clustered_t(ca.top1_per_window, cb.top1_per_window, n, clusters)
            if ca.top1_per_window and cb.top1_per_window else None)
    nll_verdict = verdict(nll["ci"], nll["n_windows"], floor=floor, min_windows=min_windows)
    kl_verdict = verdict(kl["ci"], kl["n_windows"], floor=kl_floor, min_windows=min_windows) if kl else None
    smallest = mde(nll["se"], nll["df"], floor)
    return {"delta_ppl": ppl_delta(ca.nll_per_window, n, nll["delta"]),
            "ci95": [ppl_delta(ca.nll_per_window, n, x) for x in nll["ci"]],
            "delta_nll_per_token": nll["delta"], "delta_nll_ci95": nll["ci"],
            "delta_kl": kl["delta"] if kl else None, "delta_kl_ci95": kl["ci"] if kl else None,
            "delta_top1": top1["delta"] if top1 else _top1_delta(ca, cb), "delta_top1_ci95": top1["ci"] if top1 else None,
            "verdict": combined(nll_verdict, kl_verdict), "nll_verdict": nll_verdict, "kl_verdict": kl_verdict,
            "mde_nats": smallest, "mde_ppl": ppl_delta(ca.nll_per_window, n, -smallest) if math.isfinite(smallest) else None,
            "noise_floor_nats": floor, "kl_margin": kl_floor, "calibration_sd_nats": calibration_sd,
            "n_windows": nll["n_windows"],
            "n_documents": nll["n_clusters"] if clusters else None, "min_windows": min_windows,
            "confidence": nll["confidence"], "method": nll["method"]}


def widened(interval: dict[str, Any], sd: float) -> dict[str, Any]:
    """``interval`` with ``sd`` added in quadrature to its standard error (the same t quantile)."""
    if not sd or not math.isfinite(interval["se"]):
        return interval
    se = math.hypot(interval["se"], sd)
    half = t_quantile(interval["df"], interval["confidence"]) * se
    return {**interval, "se": se, "ci": [interval["delta"] - half, interval["delta"] + half]}


def _top1_delta(ca: Any, cb: Any) -> float | None:
    return None if ca.top1_agreement is None or cb.top1_agreement is None else cb.top1_agreement - ca.top1_agreement


def combined(nll_verdict: str, kl_verdict: str | None) -> str:
    """The NLL verdict, except that an inconclusive or within-noise NLL with a clear KL verdict reads
    lowers-kl / raises-kl."""
    if nll_verdict in ("inconclusive", "within-noise") and kl_verdict in KL_READING:
        return KL_READING[kl_verdict]
    return nll_verdict


def calibration_spread(base: RunRecord, mitigated: RunRecord, key: str = "nll_per_window") -> list[float] | None:
    """The effect (mitigated minus unmitigated, per scored token; ``key``: NLL or KL) on the draw windows for
    each calibration draw, draw 0 from the candidates' own same windows; None where either run has no
    draws (dynamic schemes) or they do not match."""
    bc, mc = base.calibration, mitigated.calibration
    if not bc or not mc or not bc["draws"] or len(bc["draws"]) != len(mc["draws"]):
        return None
    lo, hi = bc["scored_windows"]
    n = sum(base.candidate.scored_per_window[lo:hi])
    own = getattr(base.candidate, key), getattr(mitigated.candidate, key)
    if own[0] is None or own[1] is None or any(d[key] is None for d in (*bc["draws"], *mc["draws"])):
        return None
    pairs = [(own[0][lo:hi], own[1][lo:hi]), *((x[key], y[key]) for x, y in zip(bc["draws"], mc["draws"]))]
    return [(sum(b) - sum(a)) / n for a, b in pairs]


def _sd(values: list[float] | None) -> float:
    return float(np.std(values, ddof=1)) if values and len(values) > 1 else 0.0


def mitigation_effect(base: RunRecord, mitigated: RunRecord, *, min_windows: int = MIN_WINDOWS) -> dict[str, Any]:
    """Mitigated minus unmitigated, paired over windows (lower ppl / KL is better), with its verdict; static
    schemes: the intervals carry the effect's spread over calibration draws (``calibration_spread``)."""
    floor, kl_floor, why = floor_of(base), kl_floor_of(base), not_applicable(base, mitigated)
    nll_draws, kl_draws = calibration_spread(base, mitigated), calibration_spread(base, mitigated, "kl_per_window")
    effect = {"baseline": _summary(base), "mitigated": _summary(mitigated),
              **paired_delta(base, mitigated, floor=floor, min_windows=min_windows, kl_floor=kl_floor,
                             calibration_sd=_sd(nll_draws), kl_calibration_sd=_sd(kl_draws))}
    if why:
        effect["verdict"] = "not-applicable"
    return {**effect, "calibration_deltas": nll_draws, "not_applicable": why, "rule": RULE,
            "noise_floor_ppl": ppl_delta(base.candidate.nll_per_window, base.candidate.scored_per_window, floor),
            "noise_floor_measured": base.noise_floor is not None, "shared_sink": shared_sink(mitigated)}


def d_sink(full: RunRecord, sink_fp: RunRecord) -> dict[str, Any]:
    """``NLL/token(full) - NLL/token(sink-fp)`` with its paired t interval."""
    f, s = full.candidate, sink_fp.candidate
    res = clustered_t(s.nll_per_window, f.nll_per_window, f.scored_per_window, clusters_of(full))
    return {"nats_per_token": res["delta"], "ci95": res["ci"], "full_ppl": f.ppl, "sink_fp_ppl": s.ppl,
            "full_run_id": full.run_id, "sink_fp_run_id": sink_fp.run_id, "n_windows": res["n_windows"],
            "confidence": res["confidence"], "method": res["method"], "shared_sink": shared_sink(full),
            "definition": D_SINK}
