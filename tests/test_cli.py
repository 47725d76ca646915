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
    (["eval", "--corpus", "file:/nonexistent.txt"], 1, "does not exist"),
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
    record = json.loads(result.output)
    assert record["protocol"]["n_windows"] == 8 and record["protocol"]["bos"] == "auto"
    assert record["candidate"]["kl"] >= 0 and 0 <= record["candidate"]["top1_agreement"] <= 1
    assert (tmp_path / f"{record['run_id']}.json").is_file()
    assert record["reference"]["cached"] is False
    table = runner.invoke(app, args, terminal_width=200)
    assert table.exit_code == 0 and "perplexity" in table.output and "reference from cache" in table.output


def test_text_shorter_than_window(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--corpus", f"file:{short}",
                                 "--scheme", "fp32", "--window", "64", "--max-tokens", "512", "--no-write"])
    assert result.exit_code == 1 and "text shorter than a window" in result.output


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
