"""A fast, fake run function for sweep tests (importable by spawned workers).

Behaviour is driven by the scheme name and environment variables, so it survives
``spawn``: ``QS_FAKE_LOG`` (append ``start|end run_id pid time`` lines),
``QS_FAKE_SLEEP`` (seconds per run), ``QS_FAKE_PEERS`` (no run ends before that many processes
have started a run: concurrent sweeps overlap however slowly each starts), ``QS_FAKE_KILL`` (a scheme at which the process
exits mid-run, like a kill), and schemes containing ``fail`` (or equal to ``QS_FAKE_FAIL``) raise unless
``QS_FAKE_HEAL`` is set.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from quantsink.config import RunConfig, stable_hash
from quantsink.errors import QuantsinkError
from quantsink.pipeline.plan import Planner
from quantsink.records.schema import RunRecord
from synthetic_records import make_record


def fake_id(config: RunConfig) -> str:
    return stable_hash(config.identity())


def planner(run_id=fake_id) -> Planner:  # noqa: ANN001
    """Plans the fake schemes as given: no canonical spelling, no variant runs, ``run_id`` faked."""
    return Planner(run_id=run_id, canonical=lambda config: config, variants=lambda config: ())


PLANNER = planner()


def _log(event: str, run_id: str) -> None:
    path = os.environ.get("QS_FAKE_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{event} {run_id} {os.getpid()} {time.time():.6f}\n".encode())
        os.close(fd)


def _first_kill() -> bool:
    """True unless ``QS_FAKE_KILL_ONCE`` names a marker file that exists (created on the first kill)."""
    marker = os.environ.get("QS_FAKE_KILL_ONCE")
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _wait_for_peers(deadline_s: float = 120.0) -> None:
    """Block until ``QS_FAKE_PEERS`` distinct processes have logged a start (or the deadline passes)."""
    peers, path = int(os.environ.get("QS_FAKE_PEERS", "0")), os.environ.get("QS_FAKE_LOG")
    end = time.monotonic() + deadline_s
    while peers and path and time.monotonic() < end:
        if len({e[2] for e in read_log(path) if e[0] == "start"}) >= peers:
            return
        time.sleep(0.05)


def fake_run(config: RunConfig, *, session: Any, progress: Any) -> RunRecord:
    run_id = fake_id(config)
    _log("start", run_id)
    tick = progress("candidate", 2)
    _wait_for_peers()
    time.sleep(float(os.environ.get("QS_FAKE_SLEEP", "0")))
    tick(1)
    if os.environ.get("QS_FAKE_KILL") and config.scheme == os.environ["QS_FAKE_KILL"] and _first_kill():
        sys.stdout.flush()
        os._exit(3)  # no cleanup, no finally: what SIGKILL leaves behind
    failing = "fail" in config.scheme or config.scheme == os.environ.get("QS_FAKE_FAIL")
    if failing and not os.environ.get("QS_FAKE_HEAL"):
        raise QuantsinkError(f"scheme {config.scheme} exploded")
    tick(1)
    _log("end", run_id)
    record = make_record(config.model, config.corpus, config.scheme, config.mitigation, ppl=11.0, stats=False)
    return dataclasses.replace(record, run_id=run_id, config=config)


def read_log(path: str) -> list[tuple[str, str, int, float]]:
    out = []
    for line in open(path).read().splitlines():
        event, run_id, pid, t = line.split()
        out.append((event, run_id, int(pid), float(t)))
    return out


def sweep_main(results: str, schemes: str, jobs: int = 1) -> None:
    """Entry for a sweep in a subprocess: ``python -c 'import sweep_fakes; sweep_fakes.sweep_main(...)'``."""
    from quantsink.sweep.grid import Grid
    from quantsink.pipeline.execute import plan
    from quantsink.sweep.local import sweep

    configs = Grid.from_mapping({"models": "m1,m2", "corpora": "c1", "schemes": schemes}).configs({"results": results})
    summary = sweep(plan(configs, PLANNER), results, jobs=jobs, run_fn=fake_run)
    print(f"ran={len(summary.done)} skipped={summary.skipped} failed={len(summary.failed)} "
          f"elsewhere={summary.elsewhere} missing={len(summary.missing)}")
    sys.exit(0 if summary.ok else 1)
