"""Resumable grid sweeps: (model x corpus x scheme x mitigation) -> one record per run.

A grid comes from the command line or a YAML file with the same keys::

    models: [smollm2-135m, gemma3-270m]
    corpora: [python-docs, python-code]
    schemes: [int8, nf4]
    mitigations: [none]
    max_tokens: 2048          # any RunConfig field: common to every run
    subgrids:                 # optional: blocks crossed with the top-level axes they do not set
      - {schemes: [w8a8], mitigations: [none, sink-fp, sink-fp+smooth]}

``+`` composes mitigations into one run (``sink-fp+smooth`` -> ``--mitigation sink-fp,smooth``);
a comma separates grid entries.

How a sweep stays correct when killed, restarted or run twice at once:

* the runs are planned by ``plan.plan`` (the one planner ``eval`` uses too): each
  grid run plus the variant runs (``none``, ``sink-fp``) its effects pair with, every
  ``run_id`` computed *before* anything runs (model file hash + corpus hash +
  canonical config, no model load); a run whose record is already in the store is skipped;
* a run is claimed with a lock file created by ``os.open(O_CREAT | O_EXCL)``
  holding the owner's pid (and process start time); a lock whose owner is dead
  is broken, so a killed worker never blocks a later sweep;
* the record is written atomically (``results.Store.write``) *before* the lock
  is released, and a claimant re-checks the store after claiming, so a run is
  never written twice;
* a file ``<run_id>.json`` that is not a valid record is renamed ``.json.invalid`` (``.invalid.N``
  when that exists: nothing set aside is overwritten) and re-run; a record written by a newer
  quantsink is kept and not re-run;
* worker processes die with the sweep process, even when it is SIGKILLed (``die_with_parent``);
* a failing run writes ``<run_id>.failed`` (JSON, not a record: readers of
  ``*.json`` never see it) with its error; it is retried by the next sweep, not
  by the one that recorded it;
* runs of one (model, corpus, protocol) are adjacent, and the first of them is
  run alone (a group lock) so the reference pass is computed once and then read
  from the reference cache by every other run and worker.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


from quantsink.pipeline.plan import PlannedRun, check_run_id, plan  # noqa: F401  (the CLI plans through this seam)
from quantsink.records.locks import owner_alive, release, try_lock  # noqa: F401  (sweeps claim runs with them)
from quantsink.pipeline.execute import default_run
from quantsink.records.schema import RunRecord
from quantsink.records.store import Store

Emit = Callable[..., None]
RunFn = Callable[..., RunRecord]



def _ordered(pending: list[PlannedRun], current: str | None, worker: int) -> list[PlannedRun]:
    """The current group first, then groups rotated by worker (workers start apart)."""
    groups = list(dict.fromkeys(p.group for p in pending))
    shift = worker % len(groups) if groups else 0
    rank = {g: i for i, g in enumerate(groups[shift:] + groups[:shift])}
    return sorted(pending, key=lambda p: (p.group != current, rank[p.group], p.index))


def work(todo: list[PlannedRun], results: str | Path, *, sweep: str, emit: Emit,
         run_fn: RunFn = default_run, worker: int = 0, poll_s: float = 0.5) -> None:
    """Claim and execute runs until every one has a record, a failure from this sweep,
    or is gone; waits (polling) on runs other processes hold."""
    store = Store(Path(results))
    store.locks.mkdir(parents=True, exist_ok=True)
    session = _new_session(run_fn)
    pending, current = list(todo), None
    while pending:
        pending = [p for p in pending if not _settled(p, store, sweep, emit, worker)]
        ran = None
        for p in _ordered(pending, current, worker):
            if _claim_and_run(p, store, sweep, emit, run_fn, session, worker):
                ran = p
                break
        if ran is not None:
            current = ran.group
            pending.remove(ran)
        elif pending:
            time.sleep(poll_s)


def _new_session(run_fn: RunFn) -> Any:
    if run_fn is default_run:
        from quantsink.pipeline.run import Session

        return Session()
    return None


def _settled(p: PlannedRun, store: Store, sweep: str, emit: Emit, worker: int) -> bool:
    if store.has_record(p.run_id):
        emit("elsewhere", worker, p.index)
        return True
    if store.failed_in(p.run_id, sweep):
        emit("elsewhere", worker, p.index)
        return True
    return False


def _claim_and_run(p: PlannedRun, store: Store, sweep: str, emit: Emit, run_fn: RunFn,
                   session: Any, worker: int) -> bool:
    """Run ``p`` if we can claim it (and, for a cold group, its reference); -> ran?"""
    group_lock = None
    if not store.warm(p.group):
        group_lock = store.locks / f"group-{p.group}.lock"
        if not try_lock(group_lock):
            return False
    run_lock = store.locks / f"{p.run_id}.lock"
    try:
        if not try_lock(run_lock):
            return False
        try:
            if store.has_record(p.run_id):  # finished by another process since we looked
                return False
            execute(p, store, sweep, emit, run_fn, session, worker)
            store.mark_warm(p.group)
            return True
        finally:
            release(run_lock)
    finally:
        if group_lock is not None:
            release(group_lock)


def execute(p: PlannedRun, store: Store, sweep: str, emit: Emit, run_fn: RunFn,
            session: Any, worker: int) -> None:
    """One run -> its record (atomic) or its failure file; never raises for a run's error."""
    emit("start", worker, p.index, p.label)

    def progress(stage: str, total: int) -> Callable[[int], None]:
        emit("stage", worker, stage, total)
        return lambda n: emit("advance", worker, n)

    t0 = time.perf_counter()
    try:
        record = run_fn(p.config.replace(results=str(store.root)), session=session, progress=progress)
        check_run_id(record, p.run_id)
        store.write(record)
        emit("end", worker, p.index, "done", time.perf_counter() - t0, "")
    except Exception as error:  # noqa: BLE001 - any run's failure is recorded, the grid goes on
        store.write_failure(p, error, sweep, time.perf_counter() - t0)
        emit("end", worker, p.index, "failed", time.perf_counter() - t0, str(error).splitlines()[0] if str(error) else type(error).__name__)


# --------------------------------------------------------------------------- processes


def die_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """End this process when ``parent`` dies, even by SIGKILL: Linux's PR_SET_PDEATHSIG, else
    (or also, if the parent died before the call) a daemon thread watching the parent pid."""
    import signal
    import threading

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="quantsink-parent-watch", daemon=True).start()


def _worker_main(todo: list[PlannedRun], results: str, sweep: str, run_fn: RunFn, worker: int,
                 threads: int, queue: Any, parent: int = 0) -> None:
    """Entry point of a spawned worker process: its own Session, events to ``queue``; it dies
    with the sweep process (a SIGKILLed sweep leaves no worker running the grid)."""
    if parent:
        die_with_parent(parent)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if run_fn is default_run:  # share the cores between workers; keep library chatter off the bar
        from quantsink.env import quiet_libraries

        quiet_libraries()
        import torch

        torch.set_num_threads(threads)
    work(todo, results, sweep=sweep, emit=lambda *event: queue.put(event), run_fn=run_fn, worker=worker)


def run_parallel(todo: list[PlannedRun], results: str | Path, *, sweep: str, emit: Emit,
                 run_fn: RunFn, jobs: int) -> list[int]:
    """``jobs`` spawned worker processes; their events are forwarded to ``emit``.
    Returns the exit codes of workers that died abnormally."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_worker_main, args=(todo, str(results), sweep, run_fn, w, threads, events,
                                                    os.getpid()),
                         name=f"quantsink-sweep-{w}") for w in range(jobs)]
    for proc in procs:
        proc.start()
    try:
        while True:
            try:
                emit(*events.get(timeout=0.2))
            except queue_mod.Empty:
                if not any(proc.is_alive() for proc in procs):
                    break  # a finished worker has flushed its events before it exits
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    return [proc.exitcode for proc in procs if proc.exitcode not in (0, None)]


# --------------------------------------------------------------------------- sweep


@dataclass
class Summary:
    """What a sweep did; ``ok`` when every run of the grid has a record at the end."""

    total: int
    skipped: int
    retried: int
    done: list[tuple[str, float]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    elsewhere: int = 0  # recorded meanwhile by another sweep on the same store
    workers: int = 1  # runs at once (local worker processes; 0: a Ray cluster, however many it lends)
    missing: list[str] = field(default_factory=list)
    crashed_workers: list[int] = field(default_factory=list)
    wall_s: float = 0.0  # the sweep's wall time
    stages: dict[str, float] = field(default_factory=dict)  # timing stages summed over the runs it recorded

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing and not self.crashed_workers

    @property
    def pass_s(self) -> float:
        """Seconds of candidate passes in the runs this sweep recorded."""
        return self.stages.get("candidate_s", 0.0)

    @property
    def all_pass_s(self) -> float:
        """Seconds of every forward pass over the windows: candidate, reference and noise-floor passes."""
        return sum(self.stages.get(stage, 0.0) for stage in ("candidate_s", "reference_s", "noise_floor_s"))


STAGES = ("load_s", "tokenize_s", "reference_s", "quantize_s", "candidate_s", "noise_floor_s", "lm_eval_s")


def stage_times(store: Store, run_ids: Iterable[str]) -> dict[str, float]:
    """``timing`` stages (seconds) summed over the stored records of ``run_ids``."""
    from quantsink.records.store import find_record

    totals = dict.fromkeys(STAGES, 0.0)
    for run_id in run_ids:
        record = find_record(store.root, run_id)
        for stage in STAGES:
            totals[stage] += float(record.timing.get(stage, 0.0)) if record is not None else 0.0
    return totals


def pending(planned: list[PlannedRun], store: Store) -> list[PlannedRun]:
    """The runs a sweep will run: those without a valid record (a newer quantsink's record
    counts as done and is never replaced; a warning says so)."""
    status = {p.run_id: store.status(p.run_id) for p in planned}
    for p in planned:
        if status[p.run_id] == "newer":
            warnings.warn(f"{p.label}: {store.record(p.run_id).name} was written by a newer quantsink; "
                          f"kept and not re-run", stacklevel=2)
    return [p for p in planned if status[p.run_id] not in ("done", "newer")]


WORKER_BYTES = 2 << 30  # memory one local worker is allowed for: a small model, its quantized copy, a forward


def worker_cap(jobs: int) -> int:
    """``jobs`` capped by the CPU cores this process may use and by the available memory (``WORKER_BYTES``
    per worker); a warning says when and why it caps."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = available_bytes()
    by_memory = max(1, memory // WORKER_BYTES) if memory is not None else jobs
    cap = max(1, min(jobs, cores, by_memory))
    if cap < jobs:
        free = f"{memory / 2**30:.0f} GiB available" if memory is not None else "memory unknown"
        warnings.warn(f"--jobs {jobs} capped to {cap}: {cores} CPU core(s), {free} at "
                      f"{WORKER_BYTES / 2**30:.0f} GiB per worker", stacklevel=2)
    return cap


def available_bytes() -> int | None:
    """MemAvailable (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def sweep(planned: list[PlannedRun], results: str | Path, *, jobs: int = 1, run_fn: RunFn = default_run,
          emit: Emit | None = None, ray: Any = None) -> Summary:
    """Run every planned run that has no valid record in ``results``; on Ray when ``ray`` is a
    ``ray_executor.RayOptions``, else in ``jobs`` local processes."""
    store = Store(Path(results))
    store.root.mkdir(parents=True, exist_ok=True)
    todo = pending(planned, store)
    for p in todo:  # a file there that is no record (corrupt, wrong shape): keep it aside, re-run
        if store.has_record(p.run_id):
            why = store.problem(p.run_id)
            warnings.warn(f"{why}; set aside as {store.set_aside(p.run_id).name} and re-run", stacklevel=2)
    retried = sum(store.failure(p.run_id).exists() for p in todo)
    summary = Summary(total=len(planned), skipped=len(planned) - len(todo), retried=retried)
    labels = {p.index: p.label for p in planned}
    finished: dict[int, str] = {}  # index -> done | failed | elsewhere (an "end" wins over "elsewhere")

    def collect(kind: str, worker: int, *args: Any) -> None:
        if kind == "end":
            index, status, seconds, error = args
            finished[index] = status
            (summary.done.append((labels[index], seconds)) if status == "done"
             else summary.failed.append((labels[index], error)))
        elif kind == "elsewhere":
            finished.setdefault(args[0], kind)
        if emit is not None:
            emit(kind, worker, *args)
            if kind in ("end", "elsewhere"):
                emit("completed", worker, len(finished))

    token = uuid.uuid4().hex
    t0 = time.perf_counter()
    if todo and ray is not None:
        from quantsink.sweep.ray_cluster import run_ray

        summary.workers = 0
        summary.crashed_workers = run_ray(todo, results, sweep=token, emit=collect, run_fn=run_fn, options=ray,
                                          real=run_fn is default_run)
    elif todo and jobs > 1:
        jobs = worker_cap(jobs)
        summary.workers = min(jobs, len(todo))
        summary.crashed_workers = run_parallel(todo, results, sweep=token, emit=collect, run_fn=run_fn,
                                               jobs=min(jobs, len(todo)))
    elif todo:
        work(todo, results, sweep=token, emit=collect, run_fn=run_fn)
    summary.wall_s = time.perf_counter() - t0
    summary.stages = stage_times(store, (p.run_id for p in todo if finished.get(p.index) == "done"))
    summary.elsewhere = sum(status == "elsewhere" for status in finished.values())
    failed_ids = {p.run_id for p in todo if store.failed_in(p.run_id, token)}
    summary.missing = [p.label for p in todo if not store.has_record(p.run_id) and p.run_id not in failed_ids]
    return summary
