"""Sweep: grid expansion, locks, resume after a kill, concurrent sweeps, failures, parallel workers."""

from __future__ import annotations

import dataclasses
import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sweep_fakes
from quantsink.config import RunConfig
from quantsink.errors import UsageError
from quantsink.sweep.grid import Grid, load_grid
from quantsink.pipeline.execute import Store, plan, try_lock
from quantsink.sweep.local import owner_alive, sweep

TESTS = Path(__file__).parent.parent
ROOT = TESTS.parent


def _configs(results: Path, schemes: str = "s1,s2,s3") -> list[RunConfig]:
    return Grid.from_mapping({"models": "m1,m2", "corpora": "c1", "schemes": schemes}).configs({"results": str(results)})


def _planned(results: Path, schemes: str = "s1,s2,s3"):
    return plan(_configs(results, schemes), sweep_fakes.PLANNER)


def _records(results: Path) -> list[str]:
    return sorted(p.stem for p in results.glob("*.json"))


def _subprocess_sweep(results: Path, schemes: str, env: dict[str, str], jobs: int = 1) -> subprocess.Popen:
    code = f"import sweep_fakes; sweep_fakes.sweep_main({str(results)!r}, {schemes!r}, {jobs})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env,
                            "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------- grid


def test_grid_expands_axes_with_common_options_and_groups_adjacent():
    grid = Grid.from_mapping({"models": ["a", "b"], "corpora": "c1,c2", "schemes": "int8,nf4:blocksize=128",
                              "mitigations": ["none", "sink-fp+smooth"], "max_tokens": 1024, "window": 256})
    configs = grid.configs()
    assert len(configs) == 2 * 2 * 2 * 2
    assert {c.scheme for c in configs} == {"int8", "nf4:blocksize=128"}
    assert {c.mitigation for c in configs} == {"none", "sink-fp,smooth"}
    assert all(c.max_tokens == 1024 and c.window == 256 for c in configs)
    pairs = [(c.model, c.corpus) for c in configs]
    assert pairs == sorted(pairs, key=pairs.index)  # each (model, corpus) group is contiguous
    assert len(list(dict.fromkeys(pairs))) == 4


def test_subgrids_cross_top_level_axes_and_deduplicate(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("models: [m1, m2]\ncorpora: [c1]\nmax_tokens: 512\nwindow: 128\njobs: 2\n"
                    "subgrids:\n  - {schemes: [int8, nf4]}\n  - {schemes: [int8, w8a8], mitigations: [none, sink-fp]}\n")
    grid, options = load_grid(path)
    configs = grid.configs()
    assert options == {"jobs": 2}
    keys = [(c.model, c.scheme, c.mitigation) for c in configs]
    assert len(keys) == len(set(keys)) == 2 * (2 + 3)  # (int8, none) appears in both blocks, once here
    assert [c.model for c in configs] == ["m1"] * 5 + ["m2"] * 5


@pytest.mark.parametrize("data, message", [
    ({"schemes": "int8", "max_tokenz": 3}, "unknown key 'max_tokenz'"),
    ({"models": "a"}, "names no schemes"),
    ({"schemes": []}, "give a list"),
    ({"schemes": "int8", "subgrids": [{"window": 3}]}, "sets only"),
])
def test_bad_grids_are_usage_errors(data, message):
    with pytest.raises(UsageError, match=message):
        Grid.from_mapping(data).configs()


def test_bad_yaml_is_one_line_error(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("schemes: [int8\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_grid(path)


def test_default_grid_file_names_only_registered_entries():
    from quantsink.mitigations import MITIGATIONS
    from quantsink.schemes import SCHEMES
    from quantsink.pipeline.execute import validate_names

    grid, _ = load_grid(ROOT / "grids" / "default.yaml")
    configs = grid.configs()
    assert {(c.model, c.corpus) for c in configs} == {("smollm2-135m", "python-docs"), ("smollm2-135m", "python-code"),
                                                      ("gemma3-270m", "python-code")}
    assert len(configs) == 96 and all(c.max_tokens == 4096 and c.window == 256 for c in configs)
    for model in ("smollm2-135m", "gemma3-270m"):  # issue 15's formats and issue 16's mitigations on both models
        ran = {(c.scheme, c.mitigation) for c in configs if c.model == model}
        assert {("w4a4-nvfp4", "sink-fp"), ("w8a8-fp8", "sink-fp"), ("kv-fp8", "none"), ("mxfp4", "none")} <= ran
        assert {("w8a8", m) for m in ("rotate", "rotate:gain=keep", "cushion", "sink-fp:k=detect")} <= ran
        assert {(f"w8a8-fp8:{g}", m) for g in ("act_gran=tensor", "act_mode=static,act_gran=tensor")
                for m in ("none", "sink-fp")} <= ran  # FP8 per tensor beside INT8 per tensor (issue 15)
        assert {("w8a8", "none"), ("w8a8-dyn", "none")} <= ran
    assert all(c.max_tokens // c.window >= 16 >= c.min_windows for c in configs)  # verdicts possible
    for key in {(c.model, c.corpus, c.scheme) for c in configs}:  # mitigated runs reuse none / sink-fp
        order = [c.mitigation for c in configs if (c.model, c.corpus, c.scheme) == key]
        assert order[0] == "none" and (len(order) == 1 or order[1] == "sink-fp")
    missing = sorted({c.scheme.split(":")[0] for c in configs if c.scheme.split(":")[0] not in SCHEMES}
                     | {m.split(":")[0] for c in configs for m in c.mitigation.split(",") if m.split(":")[0] not in MITIGATIONS})
    assert not missing, f"grid names unregistered schemes/mitigations: {missing}"
    validate_names(configs)


# --------------------------------------------------------------------------- locks


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_stale_locks_are_broken(tmp_path):
    lock = tmp_path / "x.lock"
    assert try_lock(lock)
    assert not try_lock(lock)  # held by a live process (us)
    lock.write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "start": None}))
    assert not try_lock(lock)  # a live parent still blocks
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "start": None}))
    assert try_lock(lock)  # the owner is dead: broken and re-taken
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_half_written_lock_is_stale_only_after_grace(tmp_path):
    lock = tmp_path / "y.lock"
    lock.write_text("")
    assert not try_lock(lock, grace_s=60)
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert try_lock(lock, grace_s=60)


def test_reused_pid_with_other_start_time_is_dead():
    me = {"pid": os.getpid(), "host": os.uname().nodename}
    from quantsink.records.locks import _start_time

    assert owner_alive({**me, "start": _start_time(os.getpid())})
    if _start_time(os.getpid()) is not None:
        assert not owner_alive({**me, "start": "1"})


# --------------------------------------------------------------------------- resume, failures


def test_second_sweep_skips_everything(tmp_path, monkeypatch):
    log = tmp_path / "log"
    monkeypatch.setenv("QS_FAKE_LOG", str(log))
    planned = _planned(tmp_path / "runs")
    first = sweep(planned, tmp_path / "runs", run_fn=sweep_fakes.fake_run)
    assert first.ok and len(first.done) == 6 and first.skipped == 0
    second = sweep(planned, tmp_path / "runs", run_fn=sweep_fakes.fake_run)
    assert second.ok and second.done == [] and second.skipped == 6
    assert len([e for e in sweep_fakes.read_log(str(log)) if e[0] == "end"]) == 6


def test_resume_after_worker_killed_mid_grid_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    results, log = tmp_path / "runs", tmp_path / "log"
    monkeypatch.setenv("QS_FAKE_LOG", str(log))
    env = {"QS_FAKE_LOG": str(log), "QS_FAKE_KILL": "s2"}
    proc = _subprocess_sweep(results, "s1,s2,s3", env)
    proc.communicate(timeout=120)
    assert proc.returncode == 3  # died inside run m1/s2, as a kill would
    planned = _planned(results)
    killed = next(p for p in planned if p.config.scheme == "s2" and p.config.model == "m1")
    assert _records(results) == sorted(p.run_id for p in planned if p.index < killed.index)
    assert (results / ".locks" / f"{killed.run_id}.lock").exists()  # left behind by the dead process

    summary = sweep(planned, results, run_fn=sweep_fakes.fake_run)
    assert summary.ok and summary.skipped == killed.index and len(summary.done) == 6 - killed.index
    assert _records(results) == sorted(p.run_id for p in planned)
    ends = collections.Counter(e[1] for e in sweep_fakes.read_log(str(log)) if e[0] == "end")
    assert all(n == 1 for n in ends.values()) and len(ends) == 6
    assert not list((results / ".locks").glob("*.lock"))


def test_sigkill_at_any_moment_then_resume(tmp_path, monkeypatch):
    results, log = tmp_path / "runs", tmp_path / "log"
    monkeypatch.setenv("QS_FAKE_LOG", str(log))
    proc = _subprocess_sweep(results, "s1,s2,s3,s4", {"QS_FAKE_LOG": str(log), "QS_FAKE_SLEEP": "0.15"})
    deadline = time.time() + 60
    while time.time() < deadline and len(list(results.glob("*.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = set(_records(results))
    assert 2 <= len(before) < 8
    planned = _planned(results, "s1,s2,s3,s4")
    summary = sweep(planned, results, run_fn=sweep_fakes.fake_run)
    assert summary.ok and summary.skipped == len(before)
    assert _records(results) == sorted(p.run_id for p in planned)
    ends = collections.Counter(e[1] for e in sweep_fakes.read_log(str(log)) if e[0] == "end")
    assert sorted(ends) == sorted(p.run_id for p in planned) and set(ends.values()) == {1}


def test_failing_run_is_recorded_grid_goes_on_and_next_sweep_retries(tmp_path, monkeypatch):
    results = tmp_path / "runs"
    planned = _planned(results, "s1,fail,s3")
    summary = sweep(planned, results, run_fn=sweep_fakes.fake_run)
    assert not summary.ok and len(summary.done) == 4
    assert [label for label, _ in summary.failed] == ["m1 · c1 · fail · none", "m2 · c1 · fail · none"]
    assert all("exploded" in error for _, error in summary.failed)
    failures = sorted(results.glob("*.failed"))
    assert len(failures) == 2
    data = json.loads(failures[0].read_text())
    assert data["kind"] == "quantsink-failure" and data["error_type"] == "QuantsinkError" and "Traceback" in data["traceback"]

    monkeypatch.setenv("QS_FAKE_HEAL", "1")
    again = sweep(planned, results, run_fn=sweep_fakes.fake_run)
    assert again.ok and again.retried == 2 and len(again.done) == 2 and again.skipped == 4
    assert not list(results.glob("*.failed"))


def test_planned_id_out_of_sync_is_a_failure_not_a_silent_rerun(tmp_path):
    planned = plan(_configs(tmp_path / "runs", "s1"), sweep_fakes.planner(lambda c: "wrong" + sweep_fakes.fake_id(c)[:8]))
    summary = sweep(planned, tmp_path / "runs", run_fn=sweep_fakes.fake_run)
    assert not summary.ok and all("out of sync" in error for _, error in summary.failed)


# --------------------------------------------------------------------------- concurrency


def test_two_concurrent_sweeps_duplicate_nothing(tmp_path):
    results, log = tmp_path / "runs", tmp_path / "log"
    env = {"QS_FAKE_LOG": str(log), "QS_FAKE_SLEEP": "0.1", "QS_FAKE_PEERS": "2"}  # the sweeps overlap
    procs = [_subprocess_sweep(results, "s1,s2,s3,s4,s5", env) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    events = sweep_fakes.read_log(str(log))
    ends = collections.Counter(e[1] for e in events if e[0] == "end")
    assert len(ends) == 10 and set(ends.values()) == {1}
    assert len({e[2] for e in events}) == 2  # both sweeps did part of the work
    assert _records(results) == sorted(ends)


def test_parallel_workers_share_the_grid_and_run_each_group_first_alone(tmp_path, monkeypatch):
    results, log = tmp_path / "runs", tmp_path / "log"
    monkeypatch.setenv("QS_FAKE_LOG", str(log))
    monkeypatch.setenv("QS_FAKE_SLEEP", "0.2")
    planned = _planned(results, "s1,s2,s3")
    summary = sweep(planned, results, jobs=2, run_fn=sweep_fakes.fake_run)
    assert summary.ok and len(summary.done) == 6 and summary.elsewhere == 0
    events = sweep_fakes.read_log(str(log))
    assert len({e[2] for e in events}) == 2  # two worker processes
    group = {p.run_id: p.group for p in planned}
    for g in set(group.values()):
        runs = [e for e in events if group[e[1]] == g]
        first_end = min(e[3] for e in runs if e[0] == "end")
        starts = sorted(e[3] for e in runs if e[0] == "start")
        assert starts[1] >= first_end  # the group's reference pass would be computed once


def test_worker_killed_in_parallel_sweep_is_reported_and_resumable(tmp_path, monkeypatch):
    results = tmp_path / "runs"
    monkeypatch.setenv("QS_FAKE_KILL", "s2")
    planned = _planned(results, "s1,s2")
    summary = sweep(planned, results, jobs=2, run_fn=sweep_fakes.fake_run)
    assert not summary.ok and summary.crashed_workers
    monkeypatch.delenv("QS_FAKE_KILL")
    again = sweep(planned, results, jobs=2, run_fn=sweep_fakes.fake_run)
    assert again.ok and _records(results) == sorted(p.run_id for p in planned)


def test_store_ignores_failure_of_other_sweeps(tmp_path):
    store = Store(tmp_path)
    p = _planned(tmp_path, "s1")[0]
    store.write_failure(p, RuntimeError("x"), "sweepA", 1.0)
    assert store.failed_in(p.run_id, "sweepA") and not store.failed_in(p.run_id, "sweepB")


def test_invalid_record_file_is_set_aside_and_the_run_redone(tmp_path):
    results = tmp_path / "runs"
    planned = _planned(results, "s1")
    results.mkdir()
    (results / f"{planned[0].run_id}.json").write_text("{truncated")
    with pytest.warns(UserWarning, match="corrupt"):
        summary = sweep(planned, results, run_fn=sweep_fakes.fake_run)
    assert summary.ok and len(summary.done) == 2
    assert json.loads((results / f"{planned[0].run_id}.json").read_text())["run_id"] == planned[0].run_id
    assert (results / f"{planned[0].run_id}.json.invalid").read_text() == "{truncated"


def test_summary_sums_the_pass_times_of_the_runs_it_recorded(tmp_path):
    from quantsink.cli.sweep_cmd import _time_line

    def timed(config, *, session, progress):  # noqa: ANN001,ANN202
        record = sweep_fakes.fake_run(config, session=session, progress=progress)
        return dataclasses.replace(record, timing={"candidate_s": 2.0, "quantize_s": 0.5, "noise_floor_s": 1.0})

    results = tmp_path / "runs"
    planned = _planned(results, "s1,s2")
    summary = sweep(planned, results, run_fn=timed)
    n = len(summary.done)
    assert summary.ok and n == len(planned) and summary.wall_s > 0
    assert summary.pass_s == 2.0 * n and summary.stages["quantize_s"] == 0.5 * n
    line = _time_line(summary)
    assert line.startswith(f"time: {summary.wall_s:.0f} s wall, {2 * n} s in candidate passes (wall / candidate "
                           f"passes {summary.wall_s / (2 * n):.2f}, / all passes {summary.wall_s / (3 * n):.2f})")
    assert f"quantize {0.5 * n:.0f} s" in line
    assert sweep(planned, results, run_fn=timed).pass_s == 0  # a second sweep runs nothing
