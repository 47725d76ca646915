"""The sweep on Ray: each cell a Ray task, one reference task per (model, corpus, protocol).

``quantsink sweep GRID --executor ray [--address auto|ray://HOST:10001]`` runs the same
planned runs as the local executor and writes the same records, with the same store
semantics (``sweep.Store``):

* the **driver** claims each run's lock (``O_CREAT | O_EXCL``, as a local worker does)
  before submitting it, writes its record atomically when the task returns, then
  releases the lock: a killed driver loses no finished record (each was written when
  it arrived) and a restarted sweep skips them; two sweeps never run one cell twice;
* the **reference pass** of each (model, corpus, protocol) group is one task; every
  cell of the group takes its result (the verified reference-cache file, as bytes) as
  an argument, so Ray starts the cells only once it exists, and it is computed once
  per group even on a cluster whose nodes share no disk;
* a **worker that dies** (killed process, lost node) is retried by Ray up to
  ``retries`` times; a cell whose run raises is recorded as failed (``.failed``), as
  the local executor does, and retried by the next sweep;
* resources per cell: ``num_cpus`` (torch uses that many threads) and ``num_gpus``
  (fractional allowed: ``0.25`` packs four small-model cells on one GPU; a model larger
  than one GPU takes ``num_gpus`` > 1 and is spread by ``device_map="auto"``).

Ray is optional (``pip install quantsink[ray]``); without it ``--executor ray`` fails in one line.
Task results travel through Ray's object store (Ray's own serialisation); nothing here
loads a pickle from disk.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantsink.errors import QuantsinkError, UsageError
from quantsink.io import atomic_write_bytes
from quantsink.pipeline.plan import check_run_id

_SESSION: dict[str, Any] = {}  # per Ray worker process: one Session, models loaded once


@dataclass(frozen=True)
class RayOptions:
    """How cells are placed on the cluster (``sweep --executor ray``)."""

    address: str | None = None  # None: start a local cluster; "auto": join the running one
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    retries: int = 2  # re-executions of a cell whose worker died

    def __post_init__(self) -> None:
        finite = math.isfinite(self.num_cpus) and math.isfinite(self.num_gpus)
        if not finite or self.num_cpus <= 0 or self.num_gpus < 0 or self.retries < 0:
            raise UsageError("--num-cpus must be a finite number > 0, --num-gpus a finite number >= 0 and "
                             "--retries >= 0")
        if self.address is not None and not ADDRESS.fullmatch(self.address):
            raise UsageError(f"--address {self.address!r}: give auto, local, HOST:PORT or ray://HOST:PORT")


ADDRESS = re.compile(r"auto|local|(ray://)?[A-Za-z0-9._-]+:\d{1,5}")  # what ray.init takes as an address


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'quantsink[ray]'") from None
    return ray


def connect(options: RayOptions) -> Any:
    """``ray.init`` once (joins ``address``, or starts a local cluster); quiet."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=False)
        except Exception as err:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError: all "cannot join"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise QuantsinkError(f"--address {options.address}: cannot reach a Ray cluster there ({first}); "
                                 f"check the address, or leave it out to start a local cluster") from None
    return ray


# --------------------------------------------------------------------------- worker side


def _session() -> Any:
    from quantsink.pipeline.run import Session

    return _SESSION.setdefault("session", Session())


def _threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def reference_bytes(config: Any, num_cpus: float) -> tuple[str, bytes]:
    """Task body: the group's reference pass -> (cache file name, its verified bytes)."""
    from quantsink.measure import cache
    from quantsink.pipeline.run import prepare, reference_key, reference_pass

    _threads(num_cpus)
    prep = prepare(config, _session())
    reference_pass(prep, lambda stage, total: (lambda n: None))
    path = cache.reference_path(reference_key(prep))
    return path.name, path.read_bytes()


def install_reference(name: str, data: bytes) -> None:
    """Put the reference file where this node's runs look for it (atomic; verified on load)."""
    from quantsink.measure import cache

    path = cache.reference_path(name.removesuffix(".safetensors"))
    if not path.is_file():
        atomic_write_bytes(path, data)


def cell(config: Any, reference: tuple[str, bytes] | None, run_fn: Callable[..., Any],
         num_cpus: float) -> Any:
    """Task body: one planned run -> its record (not written: the driver writes it)."""
    _threads(num_cpus)
    if reference is not None:
        install_reference(*reference)
    return run_fn(config, session=_session(), progress=lambda stage, total: (lambda n: None))


# --------------------------------------------------------------------------- driver side


@dataclass
class Submitted:
    run: Any  # sweep.PlannedRun
    lock: Path
    started: float


def run_ray(todo: list[Any], results: str | Path, *, sweep: str, emit: Callable[..., None],
            run_fn: Callable[..., Any], options: RayOptions, real: bool, poll_s: float = 0.5) -> list[int]:
    """Every planned run in ``todo`` on Ray; records written here (``real``: ``run_fn`` is the real run,
    which needs the group's reference pass shipped to its node).  -> [] (no local workers)."""
    from quantsink.records.store import Store

    ray = connect(options)
    store = Store(Path(results))
    store.locks.mkdir(parents=True, exist_ok=True)
    tasks = _remote_functions(ray, options, needs_reference=real)
    pending, waiting, references = {}, list(todo), {}
    while waiting or pending:
        waiting = _submit(waiting, store, sweep, emit, tasks, references, pending, run_fn, options)
        _collect(ray, pending, store, sweep, emit, timeout=poll_s)
    return []


def _remote_functions(ray: Any, options: RayOptions, needs_reference: bool) -> dict[str, Any]:
    res = {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus, "max_retries": options.retries}
    return {"reference": ray.remote(**res)(reference_bytes) if needs_reference else None,
            "cell": ray.remote(**res, retry_exceptions=False)(cell)}


def _submit(waiting: list[Any], store: Any, sweep: str, emit: Callable[..., None], tasks: dict[str, Any],
            references: dict[str, Any], pending: dict[Any, Submitted], run_fn: Any,
            options: RayOptions) -> list[Any]:
    """Claim and submit what can be claimed; -> runs still held by another sweep."""
    from quantsink.records.locks import try_lock

    held = []
    for p in waiting:
        if store.has_record(p.run_id) or store.failed_in(p.run_id, sweep):
            emit("elsewhere", 0, p.index)
            continue
        lock = store.locks / f"{p.run_id}.lock"
        if not try_lock(lock):
            held.append(p)
            continue
        ref = _reference(p, tasks, references, options)
        pending[tasks["cell"].remote(p.config.replace(results=str(store.root)), ref, run_fn, options.num_cpus)] = \
            Submitted(p, lock, time.perf_counter())
        emit("start", 0, p.index, p.label)
    return held


def _reference(p: Any, tasks: dict[str, Any], references: dict[str, Any], options: RayOptions) -> Any:
    if tasks["reference"] is None:
        return None
    if p.group not in references:
        references[p.group] = tasks["reference"].remote(p.config, options.num_cpus)
    return references[p.group]


def _collect(ray: Any, pending: dict[Any, Submitted], store: Any, sweep: str, emit: Callable[..., None],
             timeout: float) -> None:
    if not pending:
        time.sleep(timeout)
        return
    ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
    for obj in ready:
        _finish(ray, obj, pending.pop(obj), store, sweep, emit)


def _finish(ray: Any, obj: Any, sub: Submitted, store: Any, sweep: str, emit: Callable[..., None]) -> None:
    """A returned task -> its record (atomic) or failure file; the lock released after."""
    from quantsink.records.locks import release

    seconds = time.perf_counter() - sub.started
    try:
        record = ray.get(obj)
        check_run_id(record, sub.run.run_id)
        store.write(record)
        emit("end", 0, sub.run.index, "done", seconds, "")
    except Exception as error:  # noqa: BLE001 - a cell's failure is recorded, the grid goes on
        error = _cause(error)
        store.write_failure(sub.run, error, sweep, seconds)
        emit("end", 0, sub.run.index, "failed", seconds, _first_line(error))
    finally:
        release(sub.lock)


def _cause(error: BaseException) -> BaseException:
    """Ray wraps a task's exception; record the original (its type and one-line message)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
