"""CLI: `list mitigations` lists them; a mitigation that cannot apply is refused before any slow step."""

from typer.testing import CliRunner

from quantsink.cli import app

runner = CliRunner()


def test_list_mitigations_lists_them():
    result = runner.invoke(app, ["list", "mitigations"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("sink-fp", "clip-residual", "sink-token", "intact-kv", "smooth"):
        assert name in result.output


def test_sink_fp_with_weight_only_scheme_is_refused_in_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--scheme", "nf4", "--mitigation", "sink-fp", "--results", str(tmp_path),
                                 "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code == 2
    assert "sink-fp" in result.output and "nf4" in result.output and len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_unknown_mitigation_suggests_the_close_match(tmp_path):
    result = runner.invoke(app, ["eval", "--mitigation", "sink-tokn", "--results", str(tmp_path)])
    assert result.exit_code == 2 and "sink-token" in result.output
