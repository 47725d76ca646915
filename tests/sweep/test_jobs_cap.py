"""--jobs is capped by cores and memory, with a warning (issue 31, case 9)."""

from __future__ import annotations

import warnings

import pytest

from quantsink.sweep import local


@pytest.fixture
def machine(monkeypatch):
    def make(cores: int, gib: float | None):
        monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(local, "available_bytes", lambda: None if gib is None else int(gib * 2**30))
    return make


def test_jobs_beyond_the_cores_are_capped_with_a_warning(machine):
    machine(cores=2, gib=64)
    with pytest.warns(UserWarning, match="--jobs 1000 capped to 2: 2 CPU core"):
        assert local.worker_cap(1000) == 2


def test_jobs_beyond_the_memory_are_capped(machine):
    machine(cores=16, gib=5)
    with pytest.warns(UserWarning, match="capped to 2: 16 CPU core.*5 GiB available at 2 GiB per worker"):
        assert local.worker_cap(8) == 2
    machine(cores=16, gib=1)
    with pytest.warns(UserWarning, match="capped to 1"):
        assert local.worker_cap(8) == 1


def test_jobs_within_the_machine_are_kept_silently(machine):
    machine(cores=8, gib=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert local.worker_cap(4) == 4 and local.worker_cap(1) == 1


def test_the_sweep_starts_no_more_workers_than_the_cap(machine, monkeypatch, tmp_path):
    from quantsink.config import RunConfig
    from sweep_fakes import planner

    machine(cores=2, gib=64)
    started = []
    monkeypatch.setattr(local, "run_parallel", lambda todo, results, **kw: started.append(kw["jobs"]) or 0)
    planned = local.plan([RunConfig(scheme=s) for s in ("int8", "nf4", "w8a8", "kv4")], planner())
    with pytest.warns(UserWarning, match="--jobs 1000 capped to 2"):
        summary = local.sweep(planned, tmp_path, jobs=1000)
    assert started == [2] and summary.workers == 2
