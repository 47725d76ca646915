"""Issue 12, sweeps and files: honest headers, records never replaced by older ones, workers that
die with their sweep, variant runs computed once across concurrent plans, file modes from the umask."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sweep_fakes
from quantsink.pipeline import execute
from quantsink.sweep import local as sweep_mod
from quantsink.cli import app
from quantsink.config import RunConfig
from quantsink.pipeline.plan import Planner
from quantsink.records.schema import SCHEMA_VERSION
from quantsink.records.store import write_record
from quantsink.sweep.grid import Grid
from quantsink.pipeline.execute import plan
from quantsink.sweep.local import sweep
from synthetic_records import make_record

TESTS = Path(__file__).parent.parent
ROOT = TESTS.parent
runner = CliRunner()


def planned_runs(results: Path, schemes: str = "s1,s2"):
    configs = Grid.from_mapping({"models": "m1", "corpora": "c1", "schemes": schemes}).configs({"results": str(results)})
    return plan(configs, sweep_fakes.PLANNER)


def newer_record(run_id: str) -> dict:
    """The JSON of a record written by a newer quantsink (a schema this one cannot read)."""
    return {**make_record().to_dict(), "run_id": run_id, "schema_version": SCHEMA_VERSION + 1}


# --------------------------------------------------------------------------- header, newer, invalid


@pytest.fixture
def fake_plan(monkeypatch):
    real_plan = sweep_mod.plan
    monkeypatch.setattr(sweep_mod, "plan", lambda configs, planner=None: real_plan(configs, sweep_fakes.PLANNER))
    monkeypatch.setattr(sweep_mod, "default_run", sweep_fakes.fake_run)


def test_sweep_header_counts_what_it_will_run(tmp_path, fake_plan):
    results = tmp_path / "runs"
    first, second = planned_runs(results, "int8,nf4")
    results.mkdir()
    write_record(sweep_fakes.fake_run(first.config, session=None, progress=lambda *a: lambda n: None), results)
    (results / f"{second.run_id}.json").write_text("{truncated")
    result = runner.invoke(app, ["sweep", "--models", "m1", "--corpora", "c1", "--schemes", "int8,nf4",
                                 "--results", str(results)])
    assert result.exit_code == 0, result.output
    assert "2 runs in the grid; 1 already in" in result.output and "1 to run" in result.output
    assert "1 ran, 1 skipped" in result.output


def test_a_newer_schema_record_is_kept_and_not_rerun(tmp_path):
    results = tmp_path / "runs"
    newer, other = planned_runs(results)
    results.mkdir()
    text = json.dumps(newer_record(newer.run_id))
    (results / f"{newer.run_id}.json").write_text(text)
    with pytest.warns(UserWarning, match="written by a newer quantsink; kept and not re-run"):
        summary = sweep([newer, other], results, run_fn=sweep_fakes.fake_run)
    assert summary.ok and len(summary.done) == 1 and summary.skipped == 1
    assert (results / f"{newer.run_id}.json").read_text() == text
    assert not list(results.glob("*.invalid*"))


def test_write_record_never_replaces_a_newer_schema_record(tmp_path):
    path = tmp_path / "abc.json"
    path.write_text(json.dumps(newer_record("abc")))
    before = path.read_text()
    with pytest.warns(UserWarning, match="newer quantsink: kept"):
        write_record(dataclasses.replace(make_record(), run_id="abc"), tmp_path)
    assert path.read_text() == before


def test_a_second_invalidation_keeps_the_first_invalid_file(tmp_path):
    results = tmp_path / "runs"
    planned = planned_runs(results, "s1")
    results.mkdir()
    record = results / f"{planned[0].run_id}.json"
    for n, junk in enumerate(("{first", "{second")):
        record.write_text(junk)
        with pytest.warns(UserWarning, match="corrupt"):
            assert sweep(planned, results, run_fn=sweep_fakes.fake_run).ok
    kept = sorted(p.read_text() for p in results.glob(f"{planned[0].run_id}.json.invalid*"))
    assert kept == ["{first", "{second"]


# --------------------------------------------------------------------------- workers die with the sweep


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_workers_die_when_the_sweep_is_killed(tmp_path):
    log = tmp_path / "log"
    code = f"import sweep_fakes; sweep_fakes.sweep_main({str(tmp_path / 'runs')!r}, 's1,s2,s3', 2)"
    env = {**os.environ, "QS_FAKE_LOG": str(log), "QS_FAKE_SLEEP": "60",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(sweep_fakes.read_log(str(log)) if log.exists() else []) < 2:
            time.sleep(0.2)
        workers = {pid for _, _, pid, _ in sweep_fakes.read_log(str(log))}
        assert len(workers) == 2 and parent.pid not in workers
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:  # a worker that outlived its parent (the bug) is ended here, by its pid
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- variant runs once


class CountingRun:
    """``sweep.default_run`` stand-in: the fake run, counted per mitigation, a little slow."""

    def __init__(self, seconds: float = 0.3):
        self.calls: collections.Counter = collections.Counter()
        self.seconds, self.lock = seconds, threading.Lock()

    def __call__(self, config: RunConfig, **kwargs) -> object:
        with self.lock:
            self.calls[config.mitigation] += 1
        time.sleep(self.seconds)
        return sweep_fakes.fake_run(config, **kwargs)


REAL_VARIANTS = Planner(run_id=sweep_fakes.fake_id)  # real canonical specs and variants, fake ids


def eval_like(config: RunConfig, results: Path, fresh: bool) -> None:
    """What `quantsink eval` does: plan, then run the plan in this process."""
    execute.run_plan(plan([config], REAL_VARIANTS, fresh=fresh), results, session=None,
                       progress=lambda *a: lambda n: None)


def in_threads(*targets) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "deadlock"


def test_concurrent_plans_run_a_shared_variant_once(tmp_path, monkeypatch):
    counting = CountingRun()
    monkeypatch.setattr(execute, "default_run", counting)
    configs = [RunConfig(scheme="w8a8", mitigation=m) for m in ("smooth", "clip-residual")]
    in_threads(*(lambda c=c: eval_like(c, tmp_path, fresh=False) for c in configs))
    assert counting.calls == {"smooth": 1, "clip-residual": 1, "none": 1, "sink-fp": 1}
    assert len(list(tmp_path.glob("*.json"))) == 4 and not list((tmp_path / ".locks").glob("*.lock"))


def test_plans_that_need_each_other_as_variants_do_not_deadlock(tmp_path, monkeypatch):
    counting = CountingRun()
    monkeypatch.setattr(execute, "default_run", counting)
    configs = [RunConfig(scheme="w8a8", mitigation=m) for m in ("none", "sink-fp")]
    in_threads(*(lambda c=c: eval_like(c, tmp_path, fresh=False) for c in configs))
    assert counting.calls == {"none": 1, "sink-fp": 1}  # one lock held at a time: no cycle to wait on



# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, mask):
    from quantsink.io import atomic_write_text, umask

    old = os.umask(mask)
    try:
        assert umask() == mask
        path = write_record(dataclasses.replace(make_record(), run_id="abc"), tmp_path / "runs")
        atomic_write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_converted_model_directory_follows_the_umask(tmp_path, monkeypatch):
    from quantsink.data import models

    monkeypatch.setenv("QUANTSINK_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        models.install_converted(lambda tmp: (tmp / "config.json").write_text("{}"), tmp_path / "model")
    finally:
        os.umask(old)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "model" / models.MANIFEST).stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- lm-eval cost


def fake_prep(max_tokens: int, limit=None):
    import types

    import torch

    windows = types.SimpleNamespace(nbytes=torch.tensor([400, 400]), n_scored=200)  # 4 bytes per token
    return types.SimpleNamespace(config=RunConfig(window=2, max_tokens=max_tokens, lm_eval="python-docs",
                                                                 lm_eval_limit=limit),
                                 windows=windows)


def test_lm_eval_without_a_limit_says_what_it_will_score_and_how_to_limit_it():
    from quantsink.pipeline import lmeval
    from quantsink.data.corpus import load_corpus

    docs = load_corpus("python-docs").documents
    first = len(docs[0].encode()) / 4
    with pytest.warns(UserWarning) as caught:
        lmeval.announce_cost(fake_prep(int(first) + 1), ["python-docs", "wikitext"])
    local, hub = (str(w.message) for w in caught)
    assert f"--lm-eval python-docs: scores all {len(docs)} documents" in local
    assert "--lm-eval-limit 1 stays within --max-tokens" in local
    assert "wikitext: scores every document" in hub and "--lm-eval-limit N" in hub
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmeval.announce_cost(fake_prep(512, limit=4), ["python-docs"])  # a limit given: silent
