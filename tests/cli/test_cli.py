import json

import pytest
from typer.testing import CliRunner

from quantsink.cli import app
from quantsink.config import RunConfig

runner = CliRunner()


def test_eval_help_lists_every_run_config_option():
    result = runner.invoke(app, ["eval", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for field in RunConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in result.output
    assert "--no-stats" in result.output and "--json" in result.output


@pytest.mark.parametrize("args,code,message", [
    (["eval", "--scheme", "int9"], 2, "Did you mean 'int8'"),
    (["eval", "--scheme", "int8:thresh=1"], 2, "unknown parameter 'thresh'"),
    (["eval", "--scheme", "int8:threshold"], 2, "malformed spec"),
    (["eval", "--corpus", "pythn-docs"], 2, "unknown corpus"),
    (["eval", "--model", "no-such-model"], 2, "unknown model"),
    (["eval", "--corpus", "file:/nonexistent.txt"], 2, "does not exist"),
    (["eval", "--bos", "sometimes"], 2, "use one of auto, always, never"),
    (["eval", "--window", "1"], 2, "--window must be at least 2"),
    (["list", "shemes"], 2, "Did you mean 'schemes'"),
])
def test_bad_input_gives_one_line_error_and_exit_code(args, code, message):
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_list_schemes_shows_full_configs():
    result = runner.invoke(app, ["list", "schemes"], terminal_width=250)
    assert result.exit_code == 0
    assert "threshold=6.0" in result.output and "nf4" in result.output


def test_eval_end_to_end_on_tiny_model(tiny_model_dir, tiny_text_file, tmp_path):
    args = ["eval", "--model", str(tiny_model_dir), "--corpus", f"file:{tiny_text_file}", "--scheme", "bf16",
            "--window", "64", "--max-tokens", "512", "--results", str(tmp_path), "--no-stats"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    record = out["record"]
    assert out["effects"] == {"mitigation_effect": None, "d_sink": None, "missing": []}  # bf16: nothing to pair
    assert record["protocol"]["n_windows"] == 8 and record["protocol"]["bos"] == "auto"
    assert 0 < record["candidate"]["kl"] < 0.1 and 0.8 < record["candidate"]["top1_agreement"] <= 1  # bf16: close
    assert (tmp_path / f"{record['run_id']}.json").is_file()
    assert record["reference"]["cached"] is False
    table = runner.invoke(app, args + ["--fresh"], terminal_width=200)  # re-run: the reference from its cache
    assert table.exit_code == 0 and "perplexity" in table.output and "reference from cache" in table.output


def test_text_shorter_than_window(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--corpus", f"file:{short}",
                                 "--scheme", "fp32", "--window", "64", "--max-tokens", "512", "--no-write"])
    assert result.exit_code == 2 and "text shorter than a window" in result.output


@pytest.mark.parametrize("mitigation", ["sink-fp", "sink-token"])
def test_inspect_with_a_mitigation_on_tiny_model(tiny_model_dir, tiny_text_file, mitigation):
    args = ["inspect", "--model", str(tiny_model_dir), "--corpus", f"file:{tiny_text_file}", "--scheme", "w8a8-dyn",
            "--mitigation", mitigation, "--window", "64", "--max-tokens", "256", "--stats-windows", "2"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["stats"]) == {"reference", "candidate", "changes"}
    assert report["stats"]["candidate"]["layers"] and report["stats"]["changes"]["sink_shifts"]
    assert [m["name"] for m in report["mitigation"]] == [mitigation]
    offset = report["stats"]["changes"]["position_offset"]
    assert offset == (1 if mitigation == "sink-token" else 0)
    if mitigation == "sink-fp":
        assert report["mitigation"][0]["applied"]["positions"] == [0]
    table = runner.invoke(app, args, terminal_width=200)
    assert table.exit_code == 0 and "heads woken" in table.output


def test_eval_with_a_mitigation_runs_and_reuses_its_variants(tiny_model_dir, tiny_text_file, tmp_path):
    args = ["eval", "--model", str(tiny_model_dir), "--corpus", f"file:{tiny_text_file}", "--scheme", "w8a8-dyn",
            "--mitigation", "smooth", "--window", "64", "--max-tokens", "256", "--calib-windows", "1", "--no-stats",
            "--results", str(tmp_path)]
    plan = runner.invoke(app, args + ["--dry-run"], terminal_width=200)
    assert plan.exit_code == 0 and "3 planned runs" in plan.output and plan.output.count("to run") == 3
    assert not list(tmp_path.glob("*.json"))  # a dry run runs nothing
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    effect, d_sink = out["effects"]["mitigation_effect"], out["effects"]["d_sink"]
    assert effect["verdict"] == "insufficient-data" and effect["n_windows"] == 4  # < --min-windows 8
    assert effect["baseline"]["mitigation"] == "none" and effect["baseline"]["run_id"] != out["record"]["run_id"]
    assert d_sink["sink_fp_run_id"] != out["record"]["run_id"] and out["effects"]["missing"] == []
    assert len(list(tmp_path.glob("*.json"))) == 3  # smooth, and its none and sink-fp variants, each a record
    again = runner.invoke(app, args + ["--dry-run"], terminal_width=200)
    assert again.output.count("reused") == 4 and "re-run" not in again.output  # 1 in the caption
    fresh = runner.invoke(app, args + ["--dry-run", "--fresh"], terminal_width=200)
    assert fresh.output.count("reused") == 3 and fresh.output.count("re-run") == 1
    table = runner.invoke(app, args, terminal_width=200)
    assert table.exit_code == 0 and "verdict" in table.output and "d_sink" in table.output
    assert table.output.count("reused the stored record") == 3 and "--fresh re-runs it" in table.output


def test_eval_reuses_a_stored_record_with_the_same_run_id_unless_fresh(tiny_model_dir, tiny_text_file, tmp_path):
    args = ["eval", "--model", str(tiny_model_dir), "--corpus", f"file:{tiny_text_file}", "--scheme", "bf16",
            "--window", "64", "--max-tokens", "256", "--protocol", "windows", "--no-stats", "--results",
            str(tmp_path), "--json"]
    first = json.loads(runner.invoke(app, args).output)
    path = tmp_path / f"{first['record']['run_id']}.json"
    stored = path.read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    reused = json.loads(again.output)
    assert reused["record"] == first["record"] and path.read_bytes() == stored  # same run id, same numbers
    assert first["reused"] == [] and reused["reused"][0].startswith(f"reused the stored record {path.stem}")
    fresh = json.loads(runner.invoke(app, args + ["--fresh"]).output)
    assert fresh["reused"] == [] and fresh["record"]["run_id"] == path.stem
    assert fresh["record"]["candidate"] == first["record"]["candidate"]  # re-run: bit-identical here


def test_eval_offline_refuses_a_hub_id_in_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--model", "no-org/no-such-model", "--offline", "--results", str(tmp_path)])
    assert result.exit_code == 2 and "offline mode is on" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not list(tmp_path.glob("*.json"))


def test_report_command_reads_the_records(tmp_path):
    from synthetic_records import write_grid

    write_grid(tmp_path / "runs")
    result = runner.invoke(app, ["report", "--results", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "20 rows from 20 records" in result.output
    assert "helps" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_sweep_plans_and_records_the_variants_then_report_pairs_them(tiny_model_dir, tiny_text_file, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["sweep", "--models", str(tiny_model_dir), "--corpora", f"file:{tiny_text_file}", "--schemes", "w8a8-dyn",
            "--mitigations", "smooth", "--window", "32", "--max-tokens", "256", "--calib-windows", "1", "--no-stats",
            "--no-noise-floor", "--device", "cpu", "--results", str(runs)]
    plan = runner.invoke(app, args + ["--dry-run"], terminal_width=250)
    assert plan.exit_code == 0, plan.output
    assert "3 runs" in plan.output and plan.output.count("variant") == 2 and plan.output.count("to run") == 3
    swept = runner.invoke(app, args)
    assert swept.exit_code == 0 and "3 ran" in swept.output, swept.output
    report = runner.invoke(app, ["report", "--results", str(runs), "--out", str(out)])
    assert report.exit_code == 0 and "3 rows from 3 records" in report.output
    rows = {r["mitigation"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert rows["smooth"]["verdict"] is not None and rows["none"]["verdict"] is None
    if rows["smooth"]["verdict"] != "not-applicable":
        assert rows["smooth"]["effect"] == pytest.approx(rows["smooth"]["ppl"] - rows["none"]["ppl"], abs=1e-5)
    assert rows["none"]["d_sink"] is not None and rows["smooth"]["d_sink"] is None  # the scheme's: not repeated
