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


@pytest.mark.parametrize("body,needle", [
    (b"schemes: [int8]\nmodels: [\xff\xfe]\n", "not UTF-8 text"),
    (b"schemes: [int8]\nschemes: [nf4]\n", "key 'schemes' is given twice"),
])
def test_a_grid_file_that_is_not_utf8_or_repeats_a_key_is_one_line(tmp_path, body, needle):
    grid = tmp_path / "grid.yaml"
    grid.write_bytes(body)
    one_line(runner.invoke(app, ["sweep", str(grid), "--results", str(tmp_path / "r"), "--dry-run"]), (2,), needle)


def test_a_model_folder_whose_config_is_not_json_is_one_line(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text("{not json")
    result = runner.invoke(app, ["eval", "--model", str(model), "--corpus", "python-docs", "--scheme", "int8",
                                 "--results", str(tmp_path / "r")])
    one_line(result, (2,), "config.json: not JSON")


def test_a_full_disk_when_the_record_is_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from quantsink.errors import QuantsinkError
    from quantsink.records import store
    from synthetic_records import make_record

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "atomic_write_text", full)
    with pytest.raises(QuantsinkError, match="the disk is full") as err:
        store.write_record(make_record(), tmp_path)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_an_unwritable_reference_cache_warns_and_the_run_is_recorded(tiny_model_dir, tiny_text_file, tmp_path,
                                                                      monkeypatch):
    from quantsink.config import RunConfig
    from quantsink.pipeline.execute import run_config

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("QUANTSINK_REFERENCE_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be a folder
    config = RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", scheme="int8", window=32,
                       max_tokens=64, calib_windows=1, stats=False, noise_floor=False, device="cpu",
                       protocol="windows", results=str(tmp_path / "runs"))
    with pytest.warns(UserWarning, match="reference cache .* not written"):
        record, _ = run_config(config)
    assert (tmp_path / "runs" / f"{record.run_id}.json").is_file()


def test_inspect_plots_to_a_file_is_refused_before_the_passes(tmp_path):
    (tmp_path / "plots").write_text("x")
    result = runner.invoke(app, ["inspect", "--plots", str(tmp_path / "plots"), "--model", str(tmp_path / "absent")])
    one_line(result, (2,), "--plots")
    assert (tmp_path / "plots").read_text() == "x"


def test_eval_does_not_claim_a_newer_record_it_did_not_write(tmp_path):
    from quantsink.cli.eval_cmd import record_line
    from quantsink.records.schema import SCHEMA_VERSION
    from quantsink.records.store import write_record
    from synthetic_records import make_record

    record = make_record()
    path = write_record(record, tmp_path)
    assert record_line(path) == f"record: {path}"
    path.write_text(json.dumps({**record.to_dict(), "schema_version": SCHEMA_VERSION + 1}))
    assert record_line(path).startswith("record: not written;") and "newer quantsink" in record_line(path)
