"""Reports and compare never mix settings (issue 28): rows per full identity, each with its own baseline;
an ambiguous spec is refused; differing environments are said."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from quantsink.analysis.compare import compare, resolve
from quantsink.cli import app
from quantsink.errors import UsageError
from quantsink.records.schema import EnvRecord
from quantsink.records.store import write_record
from quantsink.report.leaderboard import environment_notes, leaderboard, write_report
from quantsink.report.matrix import matrices
from synthetic_records import make_record

runner = CliRunner()
OLD = EnvRecord(python="3.11.7", cpu_model="AMD EPYC", threads=2, libraries={"torch": "2.13.0+cpu",
                                                                            "transformers": "5.24.0"})
NEW = dataclasses.replace(OLD, libraries={"torch": "2.13.0+cpu", "transformers": "5.25.0"})


def two_calibrations(root=None, env_b: EnvRecord = OLD) -> dict[tuple[int, str], object]:
    """w8a8 and w8a8 + sink-fp, each calibrated on 4 and on 16 windows; the 16-window runs are newer and
    sink-fp helps there by 2, by 8 on 4 windows."""
    records = {}
    for calib, ppl, when, env in ((4, 30.0, "2026-11-01T00:00:00+00:00", OLD),
                                  (16, 20.0, "2026-12-01T00:00:00+00:00", env_b)):
        settings = {"calib_windows": calib}
        records[(calib, "none")] = make_record(ppl=ppl, settings=settings, created_at=when, env=env)
        records[(calib, "sink-fp")] = make_record(mitigation="sink-fp", ppl=ppl - (8 if calib == 4 else 2),
                                                  settings=settings, created_at=when, env=env)
    for record in records.values():
        if root is not None:
            write_record(record, root)
    return records


def test_two_settings_of_one_cell_are_two_rows_each_with_its_own_baseline():
    records = two_calibrations()
    frame, _, superseded = leaderboard(list(records.values()))
    assert len(frame) == 4 and superseded == 0
    mitigated = frame[frame["mitigation"] == "sink-fp"].set_index("settings")
    assert set(mitigated.index) == {"calib_windows=4", "calib_windows=16"}
    for calib, delta in ((4, -8.0), (16, -2.0)):
        row = mitigated.loc[f"calib_windows={calib}"]
        assert row["baseline"] == records[(calib, "none")].run_id
        assert row["effect"] == pytest.approx(delta) and row["ppl"] == pytest.approx(records[(calib, "sink-fp")].candidate.ppl)
    cells = {m.settings: m.cells[("w8a8", "sink-fp")].delta_ppl for m in matrices(frame.to_dict(orient="records"))}
    assert cells == pytest.approx({"calib_windows=4": -8.0, "calib_windows=16": -2.0})


def test_a_report_on_two_settings_shows_both_rows_and_says_which_is_which(tmp_path):
    two_calibrations(tmp_path / "runs")
    write_report(tmp_path / "runs", tmp_path / "out")
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "calib_windows=4" in md and "calib_windows=16" in md and "Environment" not in md


def test_one_setting_gives_no_settings_column_text():
    frame, _, _ = leaderboard([make_record(), make_record(mitigation="sink-fp", ppl=10.0)])
    assert set(frame["settings"]) == {""}


def test_the_report_says_when_environments_differ(tmp_path):
    records = two_calibrations(tmp_path / "runs", env_b=NEW)
    notes = environment_notes(list(records.values()))
    assert notes == ["2 of 4 records were computed in another environment than the other 2: "
                     "transformers 5.24.0 vs 5.25.0"] or notes[0].endswith("transformers 5.25.0 vs 5.24.0")
    write_report(tmp_path / "runs", tmp_path / "out")
    assert "transformers 5.2" in (tmp_path / "out" / "leaderboard.md").read_text()
    mixed = make_record(mitigation="sink-fp", ppl=10.0, env=NEW)
    frame, _, _ = leaderboard([make_record(env=OLD), mixed])
    assert frame.set_index("mitigation").loc["sink-fp", "env"] == "transformers 5.24.0 vs 5.25.0"


def test_compare_by_spec_refuses_an_ambiguous_match_and_lists_the_candidates(tmp_path):
    records = two_calibrations(tmp_path)
    with pytest.raises(UsageError) as refused:
        resolve("w8a8", tmp_path)
    message = str(refused.value)
    assert "matches 2 runs of different settings" in message and "\n" not in message
    assert records[(4, "none")].run_id in message and records[(16, "none")].run_id in message
    assert "calib_windows=4" in message and "calib_windows=16" in message
    result = runner.invoke(app, ["compare", "w8a8", "w8a8+sink-fp", "--results", str(tmp_path)], terminal_width=400)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_compare_by_spec_takes_the_newest_rerun_of_one_identity(tmp_path):
    old = make_record(created_at="2026-01-01T00:00:00+00:00")
    new = dataclasses.replace(old, run_id="f" * 16, created_at="2026-06-01T00:00:00+00:00")
    write_record(old, tmp_path)
    write_record(new, tmp_path)
    assert resolve("w8a8", tmp_path).run_id == new.run_id


def test_compare_shows_the_settings_and_says_when_environments_differ(tmp_path):
    a, b = make_record(env=OLD), make_record(mitigation="sink-fp", ppl=10.0, env=NEW)
    result = compare(a, b)
    assert "calib_windows=4" in result["settings"] and result["settings_differ"] is None  # the default
    assert result["env_differences"] == ["transformers 5.24.0 vs 5.25.0"]
    write_record(a, tmp_path)
    write_record(b, tmp_path)
    shown = runner.invoke(app, ["compare", a.run_id, b.run_id, "--results", str(tmp_path)], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    assert "settings: " in shown.output and "environments differ (A vs B): transformers 5.24.0 vs 5.25.0" in shown.output
