"""``compare``: two stored runs on the same model, corpus and windows, paired window by window.

Pure functions over stored records (nothing is evaluated):

* ``resolve`` finds a record from a run id, a path to a record file, or a spec
  string ``SCHEME[+MITIGATIONS]`` (e.g. ``w8a8``, ``w8a8+sink-fp``; canonicalised as
  the planner does, ``--model`` / ``--corpus`` narrow it) in a results store; a spec
  that matches runs of more than one identity (``identity_key``: every field of the run
  id but the code version, calibration windows and seed included) is refused in one line
  that lists the candidates (among re-runs of one identity, the newest is taken);
* ``check_pairable`` refuses, in one line, two runs that did not score the same
  windows (model, corpus, protocol and per-window scored tokens must agree);
* ``compare`` gives B minus A: the paired t interval over windows of the mean NLL
  per scored token (``paired.paired_t``) as a change in perplexity, its verdict
  (``paired.verdict`` with the larger of the two runs' measured noise floors:
  ``helps`` = B has the lower perplexity), the per-window deltas, KL and top-1
  side by side, and the extreme-token statistics that moved most between the two
  candidates (``stats.changes`` of A's candidate side -> B's: heads woken or put to
  sleep, sink-score and drain shifts, residual-peak shifts).

The comparison states the settings both runs share (``settings``), those in which they differ, and the
environment facts in which they differ (``EnvRecord.differences``: CPU, threads, library versions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from quantsink.config import stable_hash
from quantsink.errors import UsageError
from quantsink.analysis.effects import floor_of, kl_floor_of, paired_delta
from quantsink.measure.paired import MIN_WINDOWS
from quantsink.records.schema import RunRecord
from quantsink.records.store import find_record, iter_records, load_record, load_stored

READING = {"helps": "B is better than A", "hurts": "B is worse than A",
           "within-noise": "a significant difference, but no larger than float-level noise makes it",
           "lowers-kl": "no clear NLL difference, but B's KL from the reference is clearly lower",
           "raises-kl": "no clear NLL difference, but B's KL from the reference is clearly higher",
           "inconclusive": "no difference beyond the interval and noise margin",
           "insufficient-data": "too few windows for a verdict"}
RULE = ("B minus A, paired t 95% interval over windows (clustered by document) of the mean NLL per scored token; "
        "helps (B better) if the interval lies below -margin, hurts (B worse) if above +margin, within-noise if it "
        "excludes 0 but not the margin, inconclusive otherwise (lowers-kl / raises-kl when the KL interval clears "
        "the KL margin); insufficient-data below min_windows windows; margin: the larger noise margin of the two runs")
TOP = 5


# --------------------------------------------------------------------------- resolving RUN arguments


def resolve(arg: str, results: str | Path, *, model: str | None = None, corpus: str | None = None) -> RunRecord:
    """A record from a run id, a record file, or a ``SCHEME[+MITIGATIONS]`` spec in ``results``."""
    path = Path(arg)
    if arg.endswith(".json") or path.is_file():
        return load_record(path)
    if (Path(results) / f"{arg}.json").is_file():  # a run id's file: its own error if it is no record of it
        return load_stored(Path(results) / f"{arg}.json")
    found = find_record(results, arg) if Path(results).is_dir() else None  # a run id: one file, not the store
    if found is not None:
        return found
    records = list(iter_records(results))
    by_id = [r for r in records if r.run_id == arg]
    if by_id:
        return by_id[0]
    return _by_spec(arg, records, results, model, corpus)


def _canonical(arg: str) -> tuple[str, str]:
    from quantsink.mitigations import canonical_mitigation
    from quantsink.schemes import parse_scheme

    scheme, _, mitigation = arg.partition("+")
    try:
        return parse_scheme(scheme.strip()).spec(), canonical_mitigation(mitigation.strip() or "none")
    except UsageError as err:
        raise UsageError(f"{arg!r} is no run id, record file or SCHEME[+MITIGATIONS] spec: {err}") from None


def _by_spec(arg: str, records: list[RunRecord], results: str | Path, model: str | None,
             corpus: str | None) -> RunRecord:
    scheme, mitigation = _canonical(arg)
    found = [r for r in records if r.config.scheme == scheme and r.config.mitigation == mitigation
             and model in (None, r.model.name) and corpus in (None, r.corpus.name)]
    if not found:
        raise UsageError(f"no record of {scheme} + {mitigation} in {results}"
                         f"{_narrowed(model, corpus)}; run `quantsink eval` first or give a run id")
    newest = {}
    for r in sorted(found, key=lambda r: r.created_at):
        newest[identity_key(r)] = r
    if len(newest) > 1:
        names = varying_settings(newest.values()) or ["model", "corpus"]
        where = "; ".join(f"{r.run_id} ({r.model.name} on {r.corpus.name}, {_windows(r)}, "
                          f"{settings_label(r, names)})" for r in newest.values())
        raise UsageError(f"{arg!r} matches {len(newest)} runs of different settings: {where}; give a run id "
                         f"(or narrow with --model / --corpus)")
    return next(iter(newest.values()))


# --------------------------------------------------------------------------- identities and settings

SHOWN = ("model", "corpus", "scheme", "mitigation")  # identity fields every view names on its own
WINDOWED = ("window", "stride", "max_tokens", "bos", "protocol")  # in ``_windows``'s label


def identity_key(record: RunRecord) -> str:
    """Everything in the run id but the code version: the config's identity fields, model and corpus hashes."""
    return stable_hash(record.config.identity(), record.model.sha256, record.corpus.sha256)


def varying_settings(records: Iterable[RunRecord]) -> list[str]:
    """The identity fields (beyond model, corpus, scheme, mitigation) whose values differ among ``records``."""
    values: dict[str, set[str]] = {}
    for record in records:
        for name, value in record.config.identity().items():
            values.setdefault(name, set()).add(repr(value))
    return [name for name, seen in values.items() if len(seen) > 1 and name not in SHOWN]


def settings_label(record: RunRecord, names: Iterable[str]) -> str:
    """``calib_windows=4 seed=1``: the record's values of ``names``."""
    identity = record.config.identity()
    return " ".join(f"{name}={identity[name]}" for name in names)


def settings(record: RunRecord) -> str:
    """Every setting of the run id beyond model, corpus, scheme, mitigation and the windows."""
    names = [n for n in record.config.identity() if n not in SHOWN + WINDOWED]
    return settings_label(record, names)


def _narrowed(model: str | None, corpus: str | None) -> str:
    parts = [f"model {model}" if model else "", f"corpus {corpus}" if corpus else ""]
    return f" ({', '.join(p for p in parts if p)})" if any(parts) else ""


# --------------------------------------------------------------------------- comparing


def _windows(record: RunRecord) -> str:
    p = record.protocol
    return f"{p.n_windows}x{p.window} tok, stride {p.stride}, BOS {p.bos}, {p.kind}"


def _identity(record: RunRecord) -> tuple[Any, ...]:
    p = record.protocol
    return (record.model.sha256, record.corpus.sha256, p.kind, p.window, p.stride, p.bos, p.tokens, p.n_windows,
            tuple(record.candidate.scored_per_window))


def check_pairable(a: RunRecord, b: RunRecord) -> None:
    """One-line ``UsageError`` unless A and B scored the same windows of the same model and corpus."""
    if _identity(a) != _identity(b):
        raise UsageError(f"runs {a.run_id} ({a.model.name}, {a.corpus.name}, {_windows(a)}) and {b.run_id} "
                         f"({b.model.name}, {b.corpus.name}, {_windows(b)}) did not score the same windows; "
                         f"compare runs of one model, corpus and protocol")


def side(record: RunRecord) -> dict[str, Any]:
    c = record.candidate
    return {"run_id": record.run_id, "model": record.model.name, "corpus": record.corpus.name,
            "scheme": record.config.scheme, "mitigation": record.config.mitigation, "ppl": c.ppl,
            "ppl_ref": record.reference.ppl, "kl": c.kl, "top1_agreement": c.top1_agreement,
            "bits_per_byte": c.bits_per_byte, "simulated": record.scheme.simulated}


def per_window(a: RunRecord, b: RunRecord) -> list[dict[str, Any]]:
    """Per window: B minus A in NLL per scored token and in KL per scored token."""
    ca, cb = a.candidate, b.candidate
    kl_a, kl_b = ca.kl_per_window or [None] * len(ca.nll_per_window), cb.kl_per_window or [None] * len(ca.nll_per_window)
    return [{"window": i, "scored": n, "delta_nll_per_token": _per(nb, na, n), "delta_kl_per_token": _per(kb, ka, n)}
            for i, (na, nb, ka, kb, n) in enumerate(zip(ca.nll_per_window, cb.nll_per_window, kl_a, kl_b,
                                                        ca.scored_per_window))]


def _per(b: float | None, a: float | None, n: int) -> float | None:
    return None if a is None or b is None or not n else (b - a) / n


def paired(a: RunRecord, b: RunRecord, min_windows: int = MIN_WINDOWS) -> dict[str, Any]:
    """B minus A, paired over windows, with the interval and the verdict (lower is better)."""
    out = paired_delta(a, b, floor=max(floor_of(a), floor_of(b)), min_windows=min_windows,
                       kl_floor=max(kl_floor_of(a), kl_floor_of(b)))
    return {**out, "reading": READING[out["verdict"]], "noise_floor_measured": bool(a.noise_floor or b.noise_floor),
            "rule": RULE}


def moved(a: RunRecord, b: RunRecord, top: int = TOP) -> dict[str, Any] | None:
    """The extreme-token statistics that moved most from A's candidate to B's (None without both)."""
    from quantsink.measure.stats import changes

    sa, sb = (r.stats.candidate if r.stats else None for r in (a, b))
    if sa is None or sb is None:
        return None
    return changes(sa, sb, top=top)


def evaluator_note(a: RunRecord, b: RunRecord) -> str | None:
    """A caveat when the two runs were scored by different evaluator versions (None when the same)."""
    va, vb = a.protocol.evaluator_version, b.protocol.evaluator_version
    if va == vb:
        return None
    return (f"A was scored by evaluator {va}, B by evaluator {vb}: scoring alone can move NLL and KL in the "
            f"last digits (2 -> 3: ~1e-5 nats/token; README, The evaluation protocol)")


def compare(a: RunRecord, b: RunRecord, *, top: int = TOP) -> dict[str, Any]:
    """Everything ``quantsink compare`` shows (JSON-ready); refuses runs on different windows."""
    check_pairable(a, b)
    differ = varying_settings([a, b])
    return {"a": side(a), "b": side(b), "windows": _windows(a), "settings": settings(a),
            "settings_differ": {"a": settings_label(a, differ), "b": settings_label(b, differ)} if differ else None,
            "env_differences": a.env.differences(b.env),
            "paired": paired(a, b, a.config.min_windows),
            "per_window": per_window(a, b), "moved": moved(a, b, top), "evaluator_note": evaluator_note(a, b),
            "moved_note": "stats.changes from A's candidate statistics to B's (woken = dormant in A, active in B)"}

