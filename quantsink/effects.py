"""Does the mitigation help?  ``mitigation_effect`` and ``d_sink`` of a run record.

Both compare two passes of the same scheme over the *same* windows (same
scored tokens, same order), paired per window (statistics in ``paired``):

* ``mitigation_effect`` (runs with a mitigation): mitigated minus unmitigated
  (``S`` with ``--mitigation none``): ``delta_ppl`` with its paired t 95% interval
  over windows, ``delta_kl`` (mean KL per scored token) with its interval,
  ``delta_top1``, and ``verdict`` (``paired.verdict``): insufficient-data below
  ``RunConfig.min_windows`` windows, not-applicable when the mitigation changed
  nothing, else helps / hurts only when the interval clears the unmitigated
  run's measured noise floor (``record["noise_floor"]``), inconclusive otherwise.
* ``d_sink`` (activation/KV schemes): the damage quantizing the sink does,
  ``NLL/token(S) - NLL/token(S + sink-fp)`` in nats per scored token, with its
  CI; ``sink-fp`` keeps position 0 (the sink: BOS when the protocol has one,
  else the first token) in full precision.

The unmitigated and sink-fp passes are taken from the results store when a
record with their run_id exists and pairs with this run's windows, otherwise
evaluated once and stored, so no pass runs twice.  Where every window begins
with the same sink token (a BOS, or a prepended sink token), ``shared_sink``
says so: the sink's quantization error is common to all windows, which
therefore do not sample it.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import RunConfig
from .errors import QuantsinkError
from .paired import MIN_WINDOWS, paired_t, ppl_delta, verdict
from .results import find_record, write_record

SINK_FP = "sink-fp"
D_SINK = ("NLL per scored token with the scheme applied everywhere minus with the sink position "
          "(position 0) kept in full precision by sink-fp; nats/token")
RULE = ("insufficient-data below min_windows windows; not-applicable when the mitigation changed nothing; "
        "else helps if the delta_ppl interval lies below -noise_floor, hurts if above +noise_floor, "
        "inconclusive otherwise")
SHARED_SINK = ("every window begins with the same sink token ({token}): its quantization error is shared by all "
               "windows, so the windows do not sample it and the interval covers only the other tokens' variation")


def _pairs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["candidate"]["scored_per_window"] == b["candidate"]["scored_per_window"]


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    cand = record["candidate"]
    return {"run_id": record["run_id"], "mitigation": record["config"]["mitigation"],
            **{k: cand.get(k) for k in ("ppl", "nll_per_token", "bits_per_byte", "kl", "top1_agreement")}}


def not_applicable(base: dict[str, Any], mitigated: dict[str, Any]) -> str | None:
    """Why the mitigated run is a no-op (None when it changed something): every mitigation
    recorded ``applied: False``, or its per-window NLL and KL equal the unmitigated run's bit for bit."""
    notes = [m.get("applied") or {} for m in mitigated.get("mitigation") or []]
    if notes and all(n.get("applied") is False for n in notes):
        return "; ".join(str(n.get("why", "not applied")) for n in notes)
    b, m = base["candidate"], mitigated["candidate"]
    if b["nll_per_window"] == m["nll_per_window"] and b["kl_per_window"] == m["kl_per_window"]:
        return "the mitigated pass equals the unmitigated one bit for bit"
    return None


def shared_sink(record: dict[str, Any]) -> str | None:
    """The note that the sink is one token shared by all windows (BOS or a prepended sink token), else None."""
    token = (record.get("protocol") or {}).get("bos_token_id")
    for m in record.get("mitigation") or []:
        if (m.get("applied") or {}).get("applied") is True and "token_id" in m["applied"]:
            token = m["applied"]["token_id"]
    return None if token is None else SHARED_SINK.format(token=f"id {token}")


def floor_of(base: dict[str, Any]) -> float:
    """The unmitigated run's noise floor in nats/token (0 when it has none recorded)."""
    return float((base.get("noise_floor") or {}).get("nats_per_token") or 0.0)


def mitigation_effect(base: dict[str, Any], mitigated: dict[str, Any], *,
                      min_windows: int = MIN_WINDOWS) -> dict[str, Any]:
    """Mitigated minus unmitigated, paired over windows (lower ppl / KL is better), with its verdict."""
    b, m = base["candidate"], mitigated["candidate"]
    n = b["scored_per_window"]
    nll = paired_t(b["nll_per_window"], m["nll_per_window"], n)
    kl = paired_t(b["kl_per_window"], m["kl_per_window"], n)
    floor = floor_of(base)
    why = not_applicable(base, mitigated)
    label = "not-applicable" if why else verdict(nll["ci"], nll["n_windows"], floor=floor, min_windows=min_windows)
    return {"baseline": _summary(base),
            "delta_ppl": ppl_delta(b["nll_per_window"], n, nll["delta"]),
            "ci95": [ppl_delta(b["nll_per_window"], n, x) for x in nll["ci"]],
            "delta_nll_per_token": nll["delta"], "delta_nll_ci95": nll["ci"],
            "delta_kl": kl["delta"], "delta_kl_ci95": kl["ci"],
            "delta_top1": m["top1_agreement"] - b["top1_agreement"],
            "verdict": label, "not_applicable": why, "rule": RULE,
            "noise_floor_nats": floor, "noise_floor_ppl": ppl_delta(b["nll_per_window"], n, floor),
            "noise_floor_measured": bool(base.get("noise_floor")),
            "n_windows": nll["n_windows"], "min_windows": min_windows, "confidence": nll["confidence"],
            "method": nll["method"], "shared_sink": shared_sink(mitigated)}


def d_sink(full: dict[str, Any], sink_fp: dict[str, Any]) -> dict[str, Any]:
    """``NLL/token(full) - NLL/token(sink-fp)`` with its paired t interval."""
    f, s = full["candidate"], sink_fp["candidate"]
    res = paired_t(s["nll_per_window"], f["nll_per_window"], f["scored_per_window"])
    return {"nats_per_token": res["delta"], "ci95": res["ci"], "full_ppl": f["ppl"], "sink_fp_ppl": s["ppl"],
            "sink_fp_run_id": sink_fp["run_id"], "n_windows": res["n_windows"], "confidence": res["confidence"],
            "method": res["method"], "shared_sink": shared_sink(full), "definition": D_SINK}


def annotate(record: dict[str, Any], config: RunConfig, evaluate: Callable[[RunConfig], dict[str, Any]],
             *, write: bool) -> None:
    """Add ``mitigation_effect`` / ``d_sink`` to ``record`` (in place), fetching the variant passes they need."""
    from .schemes import parse_scheme

    token_scheme = parse_scheme(config.scheme).quantizes_tokens
    memo: dict[str, dict[str, Any]] = {config.mitigation: record}

    def get(mitigation: str) -> dict[str, Any]:
        if mitigation in memo:
            return memo[mitigation]
        # the paired statistics need only the variant's own passes: no lm-eval for it
        variant = config.replace(mitigation=mitigation, lm_eval="", lm_eval_limit=None)
        from .plan import run_id_for

        rid = run_id_for(variant, record["model"]["sha256"], record["corpus"]["sha256"])
        found = _stored(config.results, rid, record)
        if found is None and write:
            with variant_lock(config.results, rid, record) as found:
                found = found or _stored(config.results, rid, record) or compute(variant)
        memo[mitigation] = found = found or compute(variant)
        return found

    def compute(variant: RunConfig) -> dict[str, Any]:
        memo[variant.mitigation] = fresh = evaluate(variant)
        with published(config.results, fresh, write):  # seen by any process waiting on this variant
            add(fresh)
            if write:
                fresh["path"] = str(write_record(fresh, config.results))
        return fresh

    def add(rec: dict[str, Any]) -> None:
        mitigation = rec["config"]["mitigation"]
        if mitigation != "none":
            base = get("none")
            _check_pairs(base, rec)
            rec["mitigation_effect"] = mitigation_effect(base, rec, min_windows=config.min_windows)
        if token_scheme:
            full, fp = get("none"), get(SINK_FP)
            _check_pairs(full, fp)
            rec["d_sink"] = d_sink(full, fp)

    add(record)


def _stored(results: str, run_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record ``run_id`` when it pairs with ``record``'s windows."""
    found = find_record(results, run_id)
    return found if found is not None and _pairs(found, record) else None


POLL_S = 0.5


@contextmanager
def variant_lock(results: str, run_id: str, record: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
    """Hold the run lock of a variant (the lock sweeps take for a run) while computing it, so
    concurrent processes compute it once.  While another process holds it, wait; yield early
    the variant's record, stored or published by its holder (-> None once we hold the lock).

    No deadlock: a process publishes each pass it has computed (``published``) before it waits
    on any other, so a holder that waits has already published what its waiters need.
    """
    from .sweep import Store, release, try_lock

    store = Store(Path(results))
    store.locks.mkdir(parents=True, exist_ok=True)
    lock = store.locks / f"{run_id}.lock"
    while not try_lock(lock):
        found = _stored(results, run_id, record) or _published(store.locks / f"{run_id}.pass.json", record)
        if found is not None:
            yield found
            return
        time.sleep(POLL_S)
    try:
        yield None
    finally:
        release(lock)


@contextmanager
def published(results: str, record: dict[str, Any], write: bool) -> Iterator[None]:
    """Make ``record``'s passes (the bare record) readable by other processes until its record is written."""
    if not write:
        yield
        return
    from .io import atomic_write_text
    from .results import _finite

    path = Path(results) / ".locks" / f"{record['run_id']}.pass.json"
    atomic_write_text(path, json.dumps(_finite(record)))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _published(path: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        return found if _pairs(found, record) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_pairs(a: dict[str, Any], b: dict[str, Any]) -> None:
    if not _pairs(a, b):
        raise QuantsinkError(f"runs {a['run_id']} and {b['run_id']} score different windows and cannot be "
                             f"paired; delete the stale record and re-run")


def effect_table(record: dict[str, Any]) -> Any:
    """Reference / scheme / scheme + mitigation side by side, with the verdict and d_sink."""
    from rich.table import Table

    ref, cand, eff = record["reference"], record["candidate"], record["mitigation_effect"]
    base = eff["baseline"]
    scheme = record["scheme"]["spec"] + (" (simulated)" if record["scheme"]["simulated"] else "")
    mitigation = record["config"]["mitigation"]
    proto = record["protocol"]
    table = Table(title=(f"{record['model']['name']} on {record['corpus']['name']}: {scheme} + {mitigation}\n"
                         f"{proto['n_windows']} windows x {proto['window']} tokens, stride {proto['stride']}, "
                         f"BOS {proto['bos']}, {proto['scored_tokens']} scored tokens, {proto['dtype']}"),
                  title_justify="left")
    for column in ("metric", "reference", scheme, f"+ {mitigation}", "delta (mitigation)"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    lo, hi = eff["ci95"]
    table.add_row("perplexity", f"{ref['ppl']:.4g}", f"{base['ppl']:.4g}", f"{cand['ppl']:.4g}",
                  f"{eff['delta_ppl']:+.4g} [{lo:+.3g}, {hi:+.3g}]")
    table.add_row("bits per byte", f"{ref['bits_per_byte']:.4g}", f"{base['bits_per_byte']:.4g}",
                  f"{cand['bits_per_byte']:.4g}", "")
    table.add_row("KL(ref || cand) / token", "0", f"{base['kl']:.4g}", f"{cand['kl']:.4g}",
                  f"{eff['delta_kl']:+.4g}")
    table.add_row("top-1 agreement", "1", f"{base['top1_agreement']:.4g}", f"{cand['top1_agreement']:.4g}",
                  f"{eff['delta_top1']:+.4g}")
    table.add_row("verdict", "", "", "", f"[bold]{eff['verdict']}[/bold]")
    if eff.get("not_applicable"):
        table.add_row("", "", "", "", eff["not_applicable"])
    if "d_sink" in record:
        ds = record["d_sink"]
        table.add_row("d_sink (nats/token)", "", f"{ds['nats_per_token']:+.4g} "
                      f"[{ds['ci95'][0]:+.3g}, {ds['ci95'][1]:+.3g}]", "", "")
    table.caption = (f"95% interval: {eff['method']}, {eff['n_windows']} windows (verdict needs "
                     f"{eff['min_windows']}); noise floor {eff['noise_floor_ppl']:.3g} ppl"
                     + ("" if eff["noise_floor_measured"] else " (not measured)"))
    return table
