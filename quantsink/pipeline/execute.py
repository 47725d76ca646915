"""A plan executed in this process: what ``quantsink eval`` and the Python API run (the sweep's workers
run the same ``default_run``), and the one place a run's names and scheme/mitigation pairs are validated
before any work."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from quantsink.config import RunConfig
from quantsink.errors import QuantsinkError
from quantsink.pipeline.plan import PlannedRun, check_run_id, plan
from quantsink.records.locks import release, try_lock
from quantsink.records.schema import RunRecord
from quantsink.records.store import Store, check_writable_dir, find_record


def validate_names(configs: list[RunConfig]) -> None:
    """Unknown scheme / mitigation / lm-eval task names and unavailable devices fail before anything
    runs (exit 2; unknown models when the plan hashes them)."""
    from quantsink.pipeline import lmeval
    from quantsink.mitigations import parse_mitigations
    from quantsink.data.models import resolve_device
    from quantsink.schemes import parse_scheme

    for text in dict.fromkeys(c.scheme for c in configs):
        parse_scheme(text)
    for text in dict.fromkeys(c.mitigation for c in configs):
        parse_mitigations(text)
    for tasks in dict.fromkeys((c.lm_eval, c.include_path) for c in configs if c.lm_eval):
        lmeval.check_config(configs[0].replace(lm_eval=tasks[0], include_path=tasks[1]), [])
    for device in dict.fromkeys(c.device for c in configs):
        resolve_device(device)


def invalid_pair(config: RunConfig) -> str | None:
    """Why this run's mitigations cannot apply to its scheme (or to --lm-eval); None when they can."""
    from quantsink.pipeline import lmeval
    from quantsink.mitigations import parse_mitigations
    from quantsink.schemes import parse_scheme

    scheme, mitigations = parse_scheme(config.scheme), parse_mitigations(config.mitigation)
    try:
        for mitigation in mitigations:
            mitigation.check(scheme)
            mitigation.check_window(config.window)
        if config.lm_eval:
            lmeval.check([], mitigations)
    except QuantsinkError as err:
        return str(err)
    return None


def invalid_runs(planned: list[PlannedRun]) -> dict[int, str]:
    """Index -> why, for every planned run whose scheme and mitigations cannot go together."""
    reasons = {p.index: invalid_pair(p.config) for p in planned}
    return {index: why for index, why in reasons.items() if why is not None}


def default_run(config: RunConfig, *, session: Any, progress: Any) -> RunRecord:
    """The real run: ``quantsink.run.run`` with a per-worker Session (models loaded once); the
    caller writes the record (under the run's lock)."""
    from quantsink.pipeline.run import run

    return run(config, session=session, progress=progress, write=False)


Reused = Callable[[PlannedRun, RunRecord], None]  # told of each planned run whose stored record is reused


def run_plan(planned: list[PlannedRun], results: str | Path, *, session: Any, progress: Any,
             write: bool = True, poll_s: float = 0.5, on_reuse: Reused | None = None) -> dict[str, RunRecord]:
    """A plan executed in this process (``eval``), run by run: a stored record is reused (``on_reuse`` is
    told) unless the run is ``fresh``; any other run takes its run lock (waiting while another process
    holds it), runs, and is written before the lock is released.  A run's error propagates.
    -> records by run_id."""
    store = Store(Path(results))
    told = on_reuse or (lambda p, record: None)
    return {p.run_id: _run_one(p, store, session, named(progress, p, i, len(planned)), write, poll_s, told)
            for i, p in enumerate(planned, 1)}


def named(progress: Any, p: PlannedRun, i: int, n: int) -> Any:
    """``progress`` whose stages carry the run's place and name: ``run 1/2: w8a8 (the unmitigated variant):
    reference``."""
    c = p.config
    role = "" if not p.variant else " (the unmitigated variant)" if c.mitigation == "none" else " (a variant)"
    name = c.scheme + ("" if c.mitigation == "none" else f" + {c.mitigation}")
    return lambda stage, total: progress(f"run {i}/{n}: {name}{role}: {stage}", total)


def run_config(config: RunConfig, *, session: Any = None, progress: Any = None,
               write: bool = True, fresh: bool = False, on_reuse: Reused | None = None) -> tuple[RunRecord, Any]:
    """What ``quantsink eval`` does: plan ``config`` (its variant runs included), run the plan, and compute
    its effects from the records.  A stored record with the run's id is reused (its numbers are what that
    id promises); ``fresh`` re-runs the run itself (not its variants) and replaces its record.
    ``on_reuse`` is told of each reused record.  -> (its record, its ``effects.Effects``)."""
    from quantsink.analysis.effects import effects
    from quantsink.pipeline.run import Session

    if write:
        check_writable_dir(config.results, "--results")  # one line now, not an OSError after the hashing
    planned = plan([config], fresh=fresh)
    records = run_plan(planned, config.results, session=session or Session(), write=write, on_reuse=on_reuse,
                       progress=progress or (lambda stage, total: lambda n: None))
    record = records[next(p.run_id for p in planned if not p.variant)]
    return record, effects(record, records.get)


def _run_one(p: PlannedRun, store: Store, session: Any, progress: Any, write: bool, poll_s: float,
             on_reuse: Reused) -> RunRecord:
    found = _stored(p, store, on_reuse)
    if found is not None or not write:
        return found or _checked_run(p, session, progress)
    store.locks.mkdir(parents=True, exist_ok=True)
    lock = store.locks / f"{p.run_id}.lock"
    while not try_lock(lock):
        time.sleep(poll_s)
    try:
        record = _stored(p, store, on_reuse) or _checked_run(p, session, progress)  # it may have finished meanwhile
        store.write(record)
        return record
    finally:
        release(lock)


def _stored(p: PlannedRun, store: Store, on_reuse: Reused) -> RunRecord | None:
    """The stored record of a run that is not ``fresh`` (``on_reuse`` is told), else None."""
    found = None if p.fresh else find_record(store.root, p.run_id)
    if found is not None:
        on_reuse(p, found)
    return found


def _checked_run(p: PlannedRun, session: Any, progress: Any) -> RunRecord:
    record = default_run(p.config, session=session, progress=progress)
    check_run_id(record, p.run_id)
    return record
