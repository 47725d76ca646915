"""Issue 29's CLI: -h, --version, fast help, per-command options, unwrapped piped output, exit codes, dry-run."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from quantsink.cli import app
from quantsink.cli.list_cmd import applicable
from quantsink.config import __version__

runner = CliRunner()


def test_dash_h_and_version():
    assert runner.invoke(app, ["-h"]).exit_code == 0
    assert "Exit codes: 0 done; 1 a failure" in " ".join(runner.invoke(app, ["-h"]).output.split())
    assert runner.invoke(app, ["eval", "-h"]).exit_code == 0
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"quantsink {__version__}"


def test_help_imports_no_heavy_library():
    code = ("import sys; from quantsink.cli import app; from typer.testing import CliRunner; "
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
            "print(','.join(m for m in ('torch', 'transformers', 'pandas', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_testbed_is_listed_and_loads_on_use():
    assert "testbed" in runner.invoke(app, ["--help"]).output
    result = runner.invoke(app, ["testbed", "train", "-h"], terminal_width=200)
    assert result.exit_code == 0 and "--layers" in result.output


@pytest.mark.parametrize("command,absent,present", [
    ("inspect", ["--noise-draws", "--lm-eval", "--calib-draws", "--min-windows", "--results"], ["--stats-windows"]),
    ("explain", ["--noise-draws", "--lm-eval", "--calib-draws", "--dormant-attention"], ["--results", "--window"]),
])
def test_help_lists_only_the_options_a_command_uses(command, absent, present):
    output = runner.invoke(app, [command, "--help"], terminal_width=200).output
    assert all(option not in output for option in absent)
    assert all(option in output for option in present)


def test_piped_tables_do_not_wrap_at_80_columns():
    output = runner.invoke(app, ["list", "schemes"]).output  # CliRunner's stdout is not a TTY
    row = next(line for line in output.splitlines() if line.startswith("│ w8a8-kv8 "))
    assert "kv_keys=pre-rope" in row and len(row) > 120


def test_list_schemes_prints_only_fields_that_apply():
    assert applicable({"w_bits": 8, "w_gran": "channel", "w_group": 128, "act_bits": 8, "act_mode": "static",
                       "kv_bits": None, "k_gran": "token", "kv_group": None, "block": None, "mx_scale": "floor"}) \
        == {"w_bits": 8, "w_gran": "channel", "act_bits": 8, "act_mode": "static"}
    assert applicable({"w_bits": 4, "w_gran": "group", "w_group": 128})["w_group"] == 128
    output = runner.invoke(app, ["list", "schemes"]).output
    assert "kv_bits=None" not in output and "w8a8 " in output


def test_list_mitigations_has_no_kind_column():
    output = runner.invoke(app, ["list", "mitigations"]).output
    assert "post-hoc" not in output and "sink-fp" in output


def test_unknown_corpus_message_says_corpora():
    result = runner.invoke(app, ["eval", "--corpus", "pythn-docs", "--dry-run"])
    assert result.exit_code == 2 and "Valid corpora:" in result.output


@pytest.mark.parametrize("args,message", [
    (["--lm-eval", "no_such_task_xyz"], "unknown lm-eval task"),
    (["--model", "nobody/not-cached-anywhere", "--offline"], "offline mode is on"),
    (["--window", "9000", "--max-tokens", "9000"], "exceed the model's context"),
    (["--model", "."], "safetensors"),  # a folder that is no model folder
    (["--corpus", "file:/nonexistent.txt"], "does not exist"),
])
def test_dry_run_refuses_what_a_real_run_would(args, message, tmp_path):
    result = runner.invoke(app, ["eval", "--dry-run", "--results", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_dry_run_refuses_cuda_without_cuda(tmp_path):
    import torch

    result = runner.invoke(app, ["eval", "--dry-run", "--device", "cuda", "--results", str(tmp_path)])
    assert (result.exit_code == 2) == (not torch.cuda.is_available()), result.output


def test_show_prints_a_stored_record_as_eval_does(tiny_model_dir, tiny_text_file, tmp_path):
    args = ["--model", str(tiny_model_dir), "--corpus", f"file:{tiny_text_file}", "--scheme", "w8a8-dyn",
            "--mitigation", "sink-fp", "--window", "64", "--max-tokens", "512", "--results", str(tmp_path),
            "--protocol", "windows", "--no-stats", "--noise-draws", "0", "--no-noise-floor", "--min-windows", "2"]
    evaluated = runner.invoke(app, ["eval", *args], terminal_width=200)
    assert evaluated.exit_code == 0, evaluated.output
    run_id = evaluated.output.split("record: ")[-1].strip().rsplit("/", 1)[-1].removesuffix(".json")
    shown = runner.invoke(app, ["show", run_id, "--results", str(tmp_path)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    table = [line for line in evaluated.output.splitlines() if line.startswith(("│ perplexity", "│ verdict"))]
    assert len(table) == 2 and all(line in shown.output for line in table)
    as_json = runner.invoke(app, ["show", run_id, "--results", str(tmp_path), "--json"])
    assert '"mitigation_effect"' in as_json.output and '"verdict"' in as_json.output
    missing = runner.invoke(app, ["show", "0123456789abcdef", "--results", str(tmp_path)])
    assert missing.exit_code == 2


def test_an_undecided_verdict_says_how_to_get_more_evidence():
    from types import SimpleNamespace

    from quantsink.cli.eval_cmd import more_evidence

    record = SimpleNamespace(config=SimpleNamespace(max_tokens=2048, window=128), protocol=SimpleNamespace(n_windows=16))
    undecided = SimpleNamespace(mitigation_effect={"verdict": "inconclusive"})
    assert more_evidence(record, undecided).startswith("more evidence: --max-tokens 8192 (64 windows of 128)")
    assert more_evidence(record, SimpleNamespace(mitigation_effect={"verdict": "helps"})) is None
    assert more_evidence(record, SimpleNamespace(mitigation_effect=None)) is None
