"""explain refuses bad --layers and unwritable --plot paths in one line, before any pass (issue 31, 7 and 11)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from quantsink.analysis.explain import check_layers, plot
from quantsink.cli import app
from quantsink.errors import UsageError

runner = CliRunner()


@pytest.mark.parametrize("text", ["5-2", "1-1000000", "-3", "2,x"])
def test_layers_that_mean_nothing_are_refused_before_any_work(text, tmp_path):
    result = runner.invoke(app, ["explain", "--layers", text, "--model", str(tmp_path / "absent")])
    assert result.exit_code == 2, result.output
    assert "--layers" in result.output and "Traceback" not in result.output


def test_a_layer_the_model_lacks_is_refused():
    check_layers([0, 29], 30)
    check_layers(None, 30)
    with pytest.raises(UsageError, match=r"the model has 30 blocks \(0-29\); 99 is not one of them"):
        check_layers([3, 99], 30)


def test_explain_refuses_a_layer_beyond_the_model_before_any_pass(tiny_model_dir, tiny_text_file, monkeypatch):
    from quantsink.analysis import explain as E
    from quantsink.config import RunConfig

    def no_pass(*_args, **_kwargs):
        raise AssertionError("a pass ran")

    monkeypatch.setattr(E.Measurement, "reference", no_pass)
    config = RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", scheme="w8a8", window=32,
                       max_tokens=64, calib_windows=1, device="cpu", protocol="windows")
    with pytest.raises(UsageError, match="the model has 2 blocks"):
        E.measure(config, [5])


@pytest.mark.parametrize("where", ["folder", "read-only"])
def test_an_unwritable_plot_path_is_refused_before_the_work(tmp_path, where):
    target = tmp_path / "out"
    target.mkdir()
    path = target if where == "folder" else target / "plot.png"
    if where == "read-only":
        os.chmod(target, 0o500)
    try:
        result = runner.invoke(app, ["explain", "--plot", str(path), "--model", str(tmp_path / "absent")])
    finally:
        os.chmod(target, 0o700)
    if where == "read-only" and os.geteuid() == 0:
        assert result.exit_code in (1, 2)  # root writes anywhere: at least no traceback
    else:
        assert result.exit_code in (1, 2) and "--plot" in result.output, result.output
    assert "Traceback" not in result.output and list(target.iterdir()) == []


def test_a_plot_of_nothing_is_one_line():
    view = {"sites": {"rows": []}, "layers": [], "positions": None, "run": {}}
    with pytest.raises(UsageError, match="nothing to plot"):
        plot(view)
