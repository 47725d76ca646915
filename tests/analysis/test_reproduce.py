"""``quantsink reproduce``: a re-run on a tiny model is bit-identical; a doctored record is "different";
the checks are pure functions with a margin; bad input is exit 2."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from quantsink.analysis import reproduce as R
from quantsink.cli import app
from quantsink.config import RunConfig
from quantsink.pipeline.run import run
from quantsink.records.schema import RunRecord
from quantsink.records.store import write_record
from synthetic_records import make_record

runner = CliRunner()


@pytest.fixture
def stored(tiny_model_dir, tiny_text_file, tmp_path) -> RunRecord:
    config = RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", scheme="w8a8-dyn", window=32,
                       max_tokens=256, protocol="windows", stats_windows=2, device="cpu",
                       results=str(tmp_path / "runs"))
    return run(config)


def test_a_rerun_of_a_stored_record_is_bit_identical(stored, tmp_path):
    result = runner.invoke(app, ["reproduce", stored.run_id, "--results", str(tmp_path / "runs")],
                           terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "re-run's run id: the same" in result.output and "reproduced: every metric bit-identical" in result.output
    assert result.output.count("bit-identical") == len(R.checks(stored, stored, None)) + 1
    assert "stats summary: bit-identical" in result.output and "noise floor: bit-identical" in result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"{stored.run_id}.json"]  # nothing added


def test_a_doctored_record_is_different_with_its_size(stored, tmp_path):
    nll = list(stored.candidate.nll_per_window)
    nll[3] += 5.0
    doctored = dataclasses.replace(stored, candidate=dataclasses.replace(stored.candidate, nll_per_window=nll),
                                   env=dataclasses.replace(stored.env, threads=64))
    path = write_record(doctored, tmp_path / "doctored")
    result = runner.invoke(app, ["reproduce", str(path), "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    by_metric = {c["metric"]: c for c in data["checks"]}
    assert by_metric["NLL per window"]["verdict"] == "different" and by_metric["KL"]["verdict"] == "bit-identical"
    assert by_metric["NLL per window"]["where"] == "largest in window 3: 5 nats"
    assert by_metric["NLL per window"]["size"] == pytest.approx(5.0 / sum(stored.candidate.scored_per_window))
    assert data["reproduced"] is False and data["env_differences"][0].startswith("threads 64 vs ")


def test_unknown_run_is_bad_input(tmp_path):
    result = runner.invoke(app, ["reproduce", "0123456789abcdef", "--results", str(tmp_path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


# --------------------------------------------------------------------------- the checks (pure)


def test_per_window_shifts_within_the_noise_margin():
    n = [100, 100]
    same = R.windows_check("NLL", [1.0, 2.0], [1.0, 2.0], n, n, 0.01)
    small = R.windows_check("NLL", [1.0, 2.0], [1.5, 2.0], n, n, 0.01)
    large = R.windows_check("NLL", [1.0, 2.0], [1.0, 5.0], n, n, 0.01)
    assert (same.verdict, small.verdict, large.verdict) == ("bit-identical", "within margin", "different")
    assert small.size == pytest.approx(0.0025) and large.where == "largest in window 1: 3 nats"
    assert R.windows_check("NLL", [1.0], [1.0 + 1e-9], [100], [100], None).verdict == "different"  # no margin
    moved = R.windows_check("NLL", [1.0, 2.0], [1.0, 2.0, 3.0], n, [100, 100, 100], 1.0)
    assert moved.verdict == "different" and "the windows differ" in moved.where


def test_scalars_and_statistics():
    assert R.scalar_check("ppl", 21.90, 22.51, 0.5).verdict == "different"
    assert R.scalar_check("ppl", 21.90, 22.0, 0.5).verdict == "within margin"
    assert R.scalar_check("top-1", 0.93, 0.93, None).verdict == "bit-identical"
    check = R.tree_check("stats", {"layers": [{"peak": 1.0}, {"peak": 2.0}]}, {"layers": [{"peak": 1.0}, {"peak": 2.5}]})
    assert check.verdict == "different" and check.size == 0.5 and check.where == "largest at layers[1].peak"
    renamed = R.tree_check("stats", {"woken": ["L1H2"], "x": 1.0}, {"woken": ["L1H3"], "x": 1.0})
    assert renamed.size is None and renamed.where == "1 other entries changed, first woken[0]"


def test_a_mitigated_run_takes_its_unmitigated_variants_margin():
    floor = {"nats_per_token": 0.02, "ppl": 0.1}
    base = make_record(noise_floor=floor)
    mitigated = make_record(mitigation="sink-fp", ppl=10.0)
    assert R.margin_of(base, lambda rid: None) == (0.02, None)
    assert R.margin_of(mitigated, {base.run_id: base}.get) == (0.02, None)
    assert R.margin_of(mitigated, lambda rid: None) == (None, None)
    with_kl = make_record(noise_floor={**floor, "kl_margin": 0.001})
    assert R.margin_of(with_kl, lambda rid: None) == (0.02, 0.001)
