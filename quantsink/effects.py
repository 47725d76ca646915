"""Does the mitigation help?  ``mitigation_effect`` and ``d_sink`` of a run record.

Both compare two passes of the same scheme over the *same* windows (same
scored tokens, same order), paired per window (statistics in ``paired``):

* ``mitigation_effect`` (runs with a mitigation): mitigated minus unmitigated
  (``S`` with ``--mitigation none``): ``delta_ppl`` with its paired-bootstrap 95%
  CI, ``delta_kl`` (mean KL per scored token) with its CI, ``delta_top1``, and
  ``verdict`` = helps / hurts / inconclusive from the delta_ppl CI.
* ``d_sink`` (activation/KV schemes): the damage quantizing the sink does,
  ``NLL/token(S) - NLL/token(S + sink-fp)`` in nats per scored token, with its
  CI; ``sink-fp`` keeps position 0 (the sink: BOS when the protocol has one,
  else the first token) in full precision.

The unmitigated and sink-fp passes are taken from the results store when a
record with their run_id exists and pairs with this run's windows, otherwise
evaluated once and stored, so no pass runs twice.  Resampling is seeded with
``RunConfig.seed``.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import RunConfig
from .errors import QuantsinkError
from .paired import DEFAULT_RESAMPLES, paired_delta, per_token_stat, ppl_stat, verdict
from .results import find_record, write_record

SINK_FP = "sink-fp"
NEGLIGIBLE = 1e-3  # a delta_ppl CI within +-0.1% of the unmitigated ppl is no verdict (float rounding)
D_SINK = ("NLL per scored token with the scheme applied everywhere minus with the sink position "
          "(position 0) kept in full precision by sink-fp; nats/token")


def _pairs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["candidate"]["scored_per_window"] == b["candidate"]["scored_per_window"]


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    cand = record["candidate"]
    return {"run_id": record["run_id"], "mitigation": record["config"]["mitigation"],
            **{k: cand.get(k) for k in ("ppl", "nll_per_token", "bits_per_byte", "kl", "top1_agreement")}}


def mitigation_effect(base: dict[str, Any], mitigated: dict[str, Any], seed: int,
                      resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """Mitigated minus unmitigated, paired over windows (lower ppl / KL is better)."""
    b, m = base["candidate"], mitigated["candidate"]
    n = b["scored_per_window"]
    ppl = paired_delta(b["nll_per_window"], m["nll_per_window"], n, ppl_stat, seed=seed, resamples=resamples)
    kl = paired_delta(b["kl_per_window"], m["kl_per_window"], n, per_token_stat, seed=seed, resamples=resamples)
    return {"baseline": _summary(base), "delta_ppl": ppl["delta"], "ci95": ppl["ci95"],
            "delta_kl": kl["delta"], "delta_kl_ci95": kl["ci95"],
            "delta_top1": m["top1_agreement"] - b["top1_agreement"],
            "verdict": verdict(ppl["ci95"], ppl["n_windows"], negligible=NEGLIGIBLE * b["ppl"]),
            "resamples": resamples, "seed": seed, "n_windows": ppl["n_windows"], "method": ppl["method"],
            "negligible_ppl": NEGLIGIBLE * b["ppl"],
            "rule": (f"helps if the delta_ppl CI lies below -negligible_ppl ({NEGLIGIBLE:.1%} of the unmitigated "
                     f"ppl), hurts if above +negligible_ppl, else inconclusive")}


def d_sink(full: dict[str, Any], sink_fp: dict[str, Any], seed: int,
           resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """``NLL/token(full) - NLL/token(sink-fp)`` with its paired-bootstrap CI."""
    f, s = full["candidate"], sink_fp["candidate"]
    res = paired_delta(s["nll_per_window"], f["nll_per_window"], f["scored_per_window"], per_token_stat,
                       seed=seed, resamples=resamples)
    return {"nats_per_token": res["delta"], "ci95": res["ci95"], "full_ppl": f["ppl"], "sink_fp_ppl": s["ppl"],
            "sink_fp_run_id": sink_fp["run_id"], "resamples": resamples, "seed": seed,
            "n_windows": res["n_windows"], "definition": D_SINK}


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
            rec["mitigation_effect"] = mitigation_effect(base, rec, config.seed)
        if token_scheme:
            full, fp = get("none"), get(SINK_FP)
            _check_pairs(full, fp)
            rec["d_sink"] = d_sink(full, fp, config.seed)

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
    from .models import atomic_write_text
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
    if "d_sink" in record:
        ds = record["d_sink"]
        table.add_row("d_sink (nats/token)", "", f"{ds['nats_per_token']:+.4g} "
                      f"[{ds['ci95'][0]:+.3g}, {ds['ci95'][1]:+.3g}]", "", "")
    table.caption = (f"95% CI: paired bootstrap over {eff['n_windows']} windows, {eff['resamples']} resamples, "
                     f"seed {eff['seed']}")
    return table
