"""Issue 31, case 11: one line instead of a traceback, checked before the work, nothing partial left."""

from __future__ import annotations

import errno
import json

import pytest
from typer.testing import CliRunner

from quantsink.cli import app
from synthetic_records import write_grid

runner = CliRunner()


def one_line(result, codes=(1, 2), *needles: str) -> None:
    assert result.exit_code in codes, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


SWEEP = ["sweep", "--models", "smollm2", "--schemes", "int8", "--executor", "ray"]


@pytest.mark.parametrize("option,needle", [
    (["--address", "not a url::"], "--address 'not a url::'"),
    (["--num-cpus", "inf"], "--num-cpus must be a finite number"),
    (["--num-cpus", "nan"], "--num-cpus must be a finite number"),
    (["--num-gpus", "inf"], "--num-gpus a finite number"),
])
def test_bad_ray_options_are_one_line_even_in_a_dry_run(tmp_path, option, needle):
    for extra in ([], ["--dry-run"]):
        one_line(runner.invoke(app, SWEEP + option + extra + ["--results", str(tmp_path / "r")]), (2,), needle)
    assert not (tmp_path / "r").exists()


def test_an_unreachable_ray_address_is_one_line(monkeypatch):
    from quantsink.errors import QuantsinkError
    from quantsink.sweep import ray_cluster

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**_kwargs):
            raise ConnectionError("Could not find any running Ray instance.\nPlease specify ...")

    monkeypatch.setattr(ray_cluster, "import_ray", lambda: FakeRay)
    with pytest.raises(QuantsinkError, match="cannot reach a Ray cluster there") as err:
        ray_cluster.connect(ray_cluster.RayOptions(address="10.0.0.1:6379"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_bytes(b"\xff\xfe<!-- leaderboard:start -->\n<!-- leaderboard:end -->\n"), "not UTF-8"),
])
def test_a_bad_readme_is_refused_before_any_output(tmp_path, make, needle):
    write_grid(tmp_path / "runs")
    readme = tmp_path / "README.md"
    make(readme)
    result = runner.invoke(app, ["report", "--results", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                                 "--readme", str(readme)])
    one_line(result, (2,), "--readme", needle)
    assert not (tmp_path / "out").exists()
