"""The sweep on a local Ray cluster started inside the test: same records as the local executor,
a worker killed mid-grid loses and duplicates nothing, a failing cell is recorded as failed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="missing tool: ray (pip install -e '.[ray]', or make test)")

from quantsink.sweep.ray_cluster import RayOptions  # noqa: E402
from quantsink.sweep.grid import Grid
from quantsink.pipeline.execute import plan
from quantsink.sweep.local import sweep  # noqa: E402
from test_sweep_tiny import TEXT, tiny_model  # noqa: E402,F401 - the tiny Llama fixture, shared

HERE = Path(__file__).parent.parent  # tests/: sweep_fakes.py lives there


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local cluster; workers import tests/sweep_fakes.py through PYTHONPATH."""
    paths = [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=False)
    yield
    ray.shutdown()


def _records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def _fake_plan(results: Path, schemes: str):
    from sweep_fakes import PLANNER

    configs = Grid.from_mapping({"models": "m1,m2", "corpora": "c1", "schemes": schemes}).configs(
        {"results": str(results)})
    return plan(configs, PLANNER)


def test_killed_worker_is_retried_and_nothing_is_lost_or_duplicated(cluster, tmp_path, monkeypatch):
    from sweep_fakes import fake_run, read_log

    log = tmp_path / "log"
    for key, value in {"QS_FAKE_LOG": str(log), "QS_FAKE_KILL": "b", "QS_FAKE_KILL_ONCE": str(tmp_path / "killed")}.items():
        monkeypatch.setenv(key, value)
    ray.shutdown()  # workers read the environment when they start: restart with the variables set
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    planned = _fake_plan(tmp_path / "runs", "a,b,c")
    summary = sweep(planned, tmp_path / "runs", run_fn=fake_run, ray=RayOptions(retries=2))
    assert summary.ok and len(summary.done) == 6, summary
    assert (tmp_path / "killed").exists()  # a worker really died mid-cell
    assert sorted(_records(tmp_path / "runs")) == sorted(p.run_id for p in planned)
    ends = [run_id for event, run_id, _, _ in read_log(str(log)) if event == "end"]
    assert sorted(ends) == sorted(p.run_id for p in planned)  # every cell finished exactly once
    assert not list((tmp_path / "runs" / ".locks").glob("*.lock"))
    again = sweep(planned, tmp_path / "runs", run_fn=fake_run, ray=RayOptions())
    assert again.ok and again.skipped == 6 and not again.done


def test_failing_cell_is_recorded_as_failed(cluster, tmp_path):
    from sweep_fakes import fake_run

    planned = _fake_plan(tmp_path / "runs", "ok,fail")
    summary = sweep(planned, tmp_path / "runs", run_fn=fake_run, ray=RayOptions(retries=0))
    assert not summary.ok and len(summary.done) == 2 and len(summary.failed) == 2
    assert all("exploded" in error for _, error in summary.failed)
    failed = sorted((tmp_path / "runs").glob("*.failed"))
    assert len(failed) == 2 and json.loads(failed[0].read_text())["error_type"] == "QuantsinkError"


@pytest.mark.slow
def test_ray_records_equal_local_records_on_a_tiny_model(cluster, tiny_model, tmp_path, monkeypatch):
    """Real runs (reference task + cells) give the local executor's run_ids and numbers exactly."""
    import torch
    monkeypatch.setenv("QUANTSINK_CACHE", str(tmp_path / "cache"))
    model = tiny_model
    corpus = tmp_path / "docs.txt"
    corpus.write_text(TEXT)
    grid = Grid.from_mapping({"models": [str(model)], "corpora": [f"file:{corpus}"], "schemes": ["w8a8-dyn", "kv4"],
                              "mitigations": ["none", "sink-fp"], "window": 16, "max_tokens": 64,
                              "calib_windows": 1, "device": "cpu", "stats": False})
    local, remote = tmp_path / "local", tmp_path / "ray"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray cells run 1 thread each (num_cpus=1): same arithmetic
    try:
        assert sweep(plan(grid.configs({"results": str(local)})), local).ok
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("QUANTSINK_REFERENCE_CACHE", str(tmp_path / "ray-reference"))
    assert sweep(plan(grid.configs({"results": str(remote)})), remote, ray=RayOptions(num_cpus=1)).ok
    a, b = _records(local), _records(remote)
    assert sorted(a) == sorted(b) and len(a) >= 3
    for run_id in a:
        assert a[run_id]["candidate"]["nll_per_window"] == b[run_id]["candidate"]["nll_per_window"]
        assert a[run_id]["candidate"]["ppl"] == b[run_id]["candidate"]["ppl"]


def test_executor_ray_without_ray_says_so_in_one_line(monkeypatch):
    import builtins

    from quantsink.errors import UsageError
    from quantsink.sweep.ray_cluster import import_ray

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "ray" else real(name, *a, **k))
    with pytest.raises(UsageError, match=r"pip install 'quantsink\[ray\]'"):
        import_ray()


def test_cli_rejects_an_unknown_executor(tmp_path):
    from typer.testing import CliRunner

    from quantsink.cli import app

    result = CliRunner().invoke(app, ["sweep", "--schemes", "int8", "--executor", "slurm", "--results", str(tmp_path)])
    assert result.exit_code == 2 and "use local or ray" in result.output
