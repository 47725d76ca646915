"""``reproduce``: re-run a stored record from its config and say, per metric, whether its numbers came back.

A run id promises a result.  ``reproduce(record)`` re-runs ``record.config`` in a temporary results
directory with an empty reference cache of its own (both passes computed again; nothing stored is read
or overwritten) and checks each metric against the record (``check``):

* ``bit-identical``: every number equal (``==`` on the floats as stored);
* ``within margin``: not equal, but the shift is no larger than the record's noise margin: its noise floor
  (``effects.floor_of``: the mean |per-window NLL shift| per scored token that a float-level no-op produces;
  for a mitigated run, its unmitigated variant's when that record is found), in nats per scored token for
  the per-window NLL and KL, the KL and the noise floor itself, as a change in perplexity for the ppl;
  top-1 and the extreme-token statistics have no recorded margin (bit-identical or different);
* ``different``: beyond it, with the size (mean |shift| per scored token over the windows, the same
  statistic as the noise floor, and the largest single window; for scalars |Δ|; for the statistics the
  largest |Δ| and where).

It also lists which environment facts differ (``EnvRecord.differences``: CPU model and flags, threads,
library versions) and whether the re-run's run id is the record's.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from quantsink.analysis.effects import floor_of, variant_id
from quantsink.measure.paired import ppl_delta
from quantsink.records.schema import RunRecord

IDENTICAL, WITHIN, DIFFERENT = "bit-identical", "within margin", "different"
Lookup = Callable[[str], "RunRecord | None"]  # run_id -> stored record


@dataclass(frozen=True)
class Check:
    """One metric: its verdict, the size of the shift (in ``unit``), the margin it was held to, and where."""

    metric: str
    verdict: str
    size: float | None = None
    margin: float | None = None  # None: the record has no margin for this metric
    unit: str = ""
    where: str = ""

    def text(self) -> str:
        if self.verdict == IDENTICAL:
            return f"{self.metric}: {IDENTICAL}"
        margin = "no margin recorded" if self.margin is None else f"margin {_g(self.margin)}"
        parts = ([f"{_g(self.size)} {self.unit}".rstrip()] if self.size is not None else []) + [self.where]
        return f"{self.metric}: {self.verdict} ({', '.join(p for p in parts if p)}; {margin})"


def _g(x: float) -> str:
    return f"{x:.3g}"


# --------------------------------------------------------------------------- checks (pure)


def verdict(equal: bool, size: float, margin: float | None) -> str:
    if equal:
        return IDENTICAL
    return WITHIN if margin is not None and size <= margin else DIFFERENT


def windows_check(metric: str, old: Sequence[float | None] | None, new: Sequence[float | None] | None,
                  old_n: Sequence[int], new_n: Sequence[int], margin: float | None) -> Check:
    """Per-window sums: mean |Δ| per scored token (the noise floor's statistic) against the margin."""
    if old is None and new is None:
        return Check(metric, IDENTICAL)
    if old is None or new is None or list(old_n) != list(new_n) or len(old) != len(new):
        return Check(metric, DIFFERENT, where=f"the windows differ ({len(old or [])} vs {len(new or [])} windows, "
                                             f"{sum(old_n)} vs {sum(new_n)} scored tokens)", margin=margin)
    shifts = [abs(_f(b) - _f(a)) for a, b in zip(old, new)]
    size = sum(shifts) / max(sum(old_n), 1)
    worst = max(range(len(shifts)), key=shifts.__getitem__) if shifts else 0
    where = f"largest in window {worst}: {_g(shifts[worst])} nats" if shifts else ""
    return Check(metric, verdict(list(old) == list(new), size, margin), size, margin, "nats/token", where)


def _f(x: float | None) -> float:
    return math.nan if x is None else float(x)


def scalar_check(metric: str, old: float | None, new: float | None, margin: float | None, unit: str = "") -> Check:
    size = abs(_f(new) - _f(old)) if old is not None and new is not None else math.inf
    equal = old == new
    return Check(metric, verdict(equal, size, margin), None if equal else size, margin, unit)


def tree_check(metric: str, old: Any, new: Any) -> Check:
    """Nested statistics (dicts, lists, numbers): bit-identical, else the largest numeric |Δ| and its path,
    and how many other entries (names, shapes, missing parts) changed."""
    if old == new:
        return Check(metric, IDENTICAL)
    diffs = list(_leaf_diffs(old, new, ""))
    numeric = sorted((d for d in diffs if d[1] is not None), key=lambda d: -d[1])
    other = [path for path, size in diffs if size is None]
    where = [f"largest at {numeric[0][0]}"] if numeric else []
    where += [f"{len(other)} other entries changed, first {other[0] or 'the top'}"] if other else []
    return Check(metric, DIFFERENT, numeric[0][1] if numeric else None, None, "", ", ".join(where))


def _leaf_diffs(a: Any, b: Any, path: str) -> Iterator[tuple[str, float | None]]:
    """(path, |Δ|) of each numeric leaf that differs; (path, None) where anything else differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from _leaf_diffs(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _leaf_diffs(x, y, f"{path}[{i}]")
    elif _number(a) and _number(b):
        if a != b:
            yield path, abs(float(a) - float(b))
    elif a != b:
        yield path, None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _stats(record: RunRecord) -> Any:
    from dataclasses import asdict

    return None if record.stats is None else asdict(record.stats)


def _floor_value(record: RunRecord) -> float | None:
    return None if record.noise_floor is None else (record.noise_floor or {}).get("nats_per_token")


def checks(old: RunRecord, new: RunRecord, margin: float | None, kl_margin: float | None = None) -> list[Check]:
    """Every metric of ``new`` against ``old`` (``margin``: nats per scored token, None when not recorded;
    ``kl_margin``: the KL's, where the record states one apart, else ``margin``)."""
    kl_margin = margin if kl_margin is None else kl_margin
    ref_n, n = old.reference.scored_per_window, old.candidate.scored_per_window
    ppl_margin = None if margin is None else ppl_delta(old.candidate.nll_per_window, n, margin)
    ref_margin = None if margin is None else ppl_delta(old.reference.nll_per_window, ref_n, margin)
    return [
        windows_check("reference NLL per window", old.reference.nll_per_window, new.reference.nll_per_window,
                      ref_n, new.reference.scored_per_window, margin),
        windows_check("NLL per window", old.candidate.nll_per_window, new.candidate.nll_per_window, n,
                      new.candidate.scored_per_window, margin),
        windows_check("KL per window", old.candidate.kl_per_window, new.candidate.kl_per_window, n,
                      new.candidate.scored_per_window, kl_margin),
        scalar_check("reference ppl", old.reference.ppl, new.reference.ppl, ref_margin),
        scalar_check("ppl", old.candidate.ppl, new.candidate.ppl, ppl_margin),
        scalar_check("KL", old.candidate.kl, new.candidate.kl, kl_margin, "nats/token"),
        scalar_check("top-1", old.candidate.top1_agreement, new.candidate.top1_agreement, None),
        scalar_check("noise floor", _floor_value(old), _floor_value(new), margin, "nats/token"),
        tree_check("stats summary", _stats(old), _stats(new)),
    ]


def margin_of(record: RunRecord, lookup: Lookup) -> tuple[float | None, float | None]:
    """(NLL, KL) noise margins in nats/token: the record's noise floor (and ``kl_margin`` where it states
    one); a mitigated run's are its unmitigated variant's, when stored.  None: no margin recorded."""
    base = record
    if record.noise_floor is None and record.config.mitigation != "none":
        base = lookup(variant_id(record, "none")) or record
    if base.noise_floor is None:
        return None, None
    return floor_of(base), base.noise_floor.get("kl_margin")


# --------------------------------------------------------------------------- the re-run


@dataclass(frozen=True)
class Reproduction:
    """A stored record, its re-run, each metric's check and the environment facts that differ."""

    original: RunRecord
    rerun: RunRecord
    margin: float | None
    kl_margin: float | None
    checks: tuple[Check, ...]
    env_differences: tuple[str, ...]

    @property
    def reproduced(self) -> bool:
        """Every metric bit-identical or within the margin."""
        return all(c.verdict != DIFFERENT for c in self.checks)

    @property
    def same_run_id(self) -> bool:
        return self.original.run_id == self.rerun.run_id

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.original.run_id, "rerun_run_id": self.rerun.run_id, "reproduced": self.reproduced,
                "margin_nats_per_token": self.margin, "kl_margin": self.kl_margin, "checks": [vars(c) for c in self.checks],
                "env_differences": list(self.env_differences)}


@contextlib.contextmanager
def _variable(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def rerun(record: RunRecord, *, session: Any = None, progress: Any = None) -> RunRecord:
    """``record.config`` run again in a temporary results directory with an empty reference cache (both
    passes recomputed; nothing stored is read or overwritten) -> the new record."""
    from quantsink.pipeline.run import run

    with tempfile.TemporaryDirectory(prefix="quantsink-reproduce-") as tmp:
        with _variable("QUANTSINK_REFERENCE_CACHE", str(Path(tmp) / "reference")):
            kwargs = {"progress": progress} if progress else {}
            return run(record.config.replace(results=str(Path(tmp) / "runs")), session=session, **kwargs)


def reproduce(record: RunRecord, lookup: Lookup = lambda run_id: None, *, session: Any = None,
              progress: Any = None) -> Reproduction:
    """Re-run ``record`` (``rerun``) and check every metric against it (``checks``)."""
    new = rerun(record, session=session, progress=progress)
    margin, kl_margin = margin_of(record, lookup)
    return Reproduction(record, new, margin, kl_margin, tuple(checks(record, new, margin, kl_margin)),
                        tuple(record.env.differences(new.env)))
