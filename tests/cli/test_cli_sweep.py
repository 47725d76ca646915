"""CLI mapping of `quantsink sweep` / `quantsink report` (typer CliRunner), and the html in Chromium."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sweep_fakes
from quantsink.sweep import local as sweep_mod
from quantsink.cli import app
from quantsink.report.leaderboard import COLUMNS, write_report
from synthetic_records import make_record, write_grid

ROOT = Path(__file__).parent.parent.parent
runner = CliRunner()


@pytest.fixture
def captured(monkeypatch):
    """Replace the sweep's run function by the fast fake and plan ids without hashing models."""
    real_plan = sweep_mod.plan
    seen: dict = {}

    def fake_plan(configs, planner=None):
        seen["configs"] = configs
        return real_plan(configs, sweep_fakes.PLANNER)

    real_sweep = sweep_mod.sweep

    def fake_sweep(planned, results, **kwargs):
        seen["jobs"] = kwargs.get("jobs")
        return real_sweep(planned, results, **kwargs)

    monkeypatch.setattr(sweep_mod, "plan", fake_plan)
    monkeypatch.setattr(sweep_mod, "sweep", fake_sweep)
    monkeypatch.setattr(sweep_mod, "default_run", sweep_fakes.fake_run)
    return seen


def test_sweep_options_map_to_run_configs(tmp_path, captured):
    result = runner.invoke(app, ["sweep", "--models", "a,b", "--schemes", "int8,nf4:blocksize=128", "--corpora",
                                 "python-docs", "--max-tokens", "1024", "--window", "256", "--no-stats",
                                 "--results", str(tmp_path / "runs"), "--jobs", "1"])
    assert result.exit_code == 0, result.output
    configs = captured["configs"]
    assert [(c.model, c.scheme) for c in configs] == [("a", "int8"), ("a", "nf4:blocksize=128"),
                                                      ("b", "int8"), ("b", "nf4:blocksize=128")]
    assert all(c.max_tokens == 1024 and c.window == 256 and c.stats is False and c.mitigation == "none"
               and c.results == str(tmp_path / "runs") for c in configs)
    assert "4 runs in the grid; 0 already" in result.output and "4 ran" in result.output
    again = runner.invoke(app, ["sweep", "--models", "a,b", "--schemes", "int8,nf4:blocksize=128", "--max-tokens",
                                "1024", "--window", "256", "--no-stats", "--results", str(tmp_path / "runs")])
    assert again.exit_code == 0 and "4 already in" in again.output and "0 ran, 4 skipped" in again.output


def test_grid_file_with_command_line_overrides(tmp_path, captured):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"models: [m]\nschemes: [int8, nf4]\nmax_tokens: 512\nwindow: 128\n"
                    f"results: {tmp_path / 'from-file'}\njobs: 2\n")
    result = runner.invoke(app, ["sweep", str(grid), "--max-tokens", "1024", "--schemes", "int8"])
    assert result.exit_code == 0, result.output
    (config,) = captured["configs"]
    assert (config.scheme, config.max_tokens, config.window) == ("int8", 1024, 128)
    assert config.results == str(tmp_path / "from-file") and captured["jobs"] == 2


def test_failed_run_gives_exit_code_1_and_is_listed(tmp_path, captured, monkeypatch):
    monkeypatch.setenv("QS_FAKE_FAIL", "nf4")
    result = runner.invoke(app, ["sweep", "--models", "m", "--schemes", "int8,nf4", "--results", str(tmp_path)])
    assert result.exit_code == 1
    assert "1 failed" in result.output and "exploded" in result.output


def test_dry_run_lists_runs_and_runs_nothing(tmp_path, captured):
    result = runner.invoke(app, ["sweep", "--models", "m", "--schemes", "int8", "--mitigations", "none",
                                 "--results", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0 and "to run" in result.output
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("args, message", [
    (["--schemes", "int9"], "unknown scheme 'int9'"),
    (["--schemes", "int8", "--mitigations", "nonee"], "unknown mitigation"),
    (["--schemes", "int8", "--jobs", "0"], "--jobs must be at least 1"),
    (["--schemes", "int8", "--window", "1"], "--window must be at least 2"),
    ([], "names no schemes"),
])
def test_bad_sweep_input_is_a_one_line_usage_error(tmp_path, captured, args, message):
    result = runner.invoke(app, ["sweep", "--results", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_missing_grid_file_exits_2(tmp_path):
    result = runner.invoke(app, ["sweep", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_report_command_writes_files_and_warns_about_skipped(tmp_path):
    write_grid(tmp_path / "runs")
    (tmp_path / "runs" / "bad.json").write_text("[]")
    result = runner.invoke(app, ["report", "--results", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "20 rows from 20 records" in result.output and "1 files skipped" in result.output
    assert "warning:" in result.output and "bad.json" in result.output
    assert (tmp_path / "out" / "leaderboard.html").is_file()


# --------------------------------------------------------------------------- headless Chromium

sys.path.insert(0, str(ROOT / "scripts"))
import check_html  # noqa: E402

needs_chromium = pytest.mark.skipif(check_html.chromium() is None,
                                    reason="missing tool: chromium (as root: apt-get update && apt-get install -y chromium)")


@needs_chromium
def test_html_renders_in_headless_chromium_with_table_plots_and_sorting(tmp_path):
    from quantsink.records.store import write_record

    write_grid(tmp_path / "runs")
    write_record(make_record(model="<img src=x onerror=alert(1)>", scheme="int8"), tmp_path / "runs")
    write_report(tmp_path / "runs", tmp_path / "out")
    page = tmp_path / "out" / "leaderboard.html"
    result = check_html.check(page, tmp_path / "shot.png", rows=21)
    assert result["failed"] == [], json.dumps(result)
    assert result["png_images"] == 5 and result["white_fraction"] < 0.97
    # 4 model/corpus matrices of w8a8 x (sink-fp, smooth); sink-fp helps and is marked best in each;
    # the ranking: 13 schemes and a split row per (model, corpus, real | simulated kernels): 9
    assert (result["matrix_cells"], result["best_cells"], result["ranking_rows"]) == (8, 4, 22)
    assert result["shown_columns"] == 13 and result["record_links"] == 21
    col = list(COLUMNS).index("ppl")
    dom = check_html.rendered(page, f"#sort=-{col}")
    values = [float(cells[col]) for cells in dom.cells]
    assert len(values) == 21 and values == sorted(values, reverse=True)  # the page's sorter ran


def test_report_puts_the_table_between_the_readme_markers(tmp_path):
    write_grid(tmp_path / "runs")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- leaderboard:start -->\nold table\n<!-- leaderboard:end -->\n\nafter\n")
    args = ["report", "--results", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--readme", str(readme)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert "old table" not in text and "| tiny-gemma |" in text and text.endswith("<!-- leaderboard:end -->\n\nafter\n")
    assert "unchanged" in runner.invoke(app, args).output  # idempotent
    readme.write_text("no markers")
    bad = runner.invoke(app, args)
    assert bad.exit_code == 1 and "markers" in bad.output
