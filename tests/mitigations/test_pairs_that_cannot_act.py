"""Parameters beyond the window and pairs that cannot act are refused in one line, before any work
(issue 31, case 4)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from quantsink.cli import app
from quantsink.config import RunConfig
from quantsink.pipeline.execute import invalid_pair

runner = CliRunner()


@pytest.mark.parametrize("scheme,mitigation,window,message", [
    ("w8a8", "sink-fp:k=1000", 256, "sink-fp:k=1000 keeps every position of a 256-token window"),
    ("w8a8", "sink-fp:k=256", 256, "use k below 256"),
    ("kv4", "smooth", 256, "smooth reshapes Linear weights and inputs, but scheme 'kv4' quantizes neither"),
    ("kv4", "rotate", 256, "rotate reshapes Linear weights and inputs, but scheme 'kv4' quantizes neither"),
    ("int8", "cushion", 256, "scheme 'int8' has no such quantization"),
    ("nf4", "cushion", 256, "scheme 'nf4' has no such quantization"),
])
def test_a_pair_that_cannot_act_is_refused(scheme, mitigation, window, message):
    why = invalid_pair(RunConfig(scheme=scheme, mitigation=mitigation, window=window))
    assert why is not None and message in why and "\n" not in why


@pytest.mark.parametrize("scheme,mitigation", [
    ("w8a8", "sink-fp:k=4"), ("w8a8", "smooth"), ("w8a8-dyn", "rotate"), ("nf4", "smooth"), ("kv4", "cushion"),
    ("w8a8", "cushion"), ("kv4", "sink-fp"),
])
def test_pairs_that_act_are_accepted(scheme, mitigation):
    assert invalid_pair(RunConfig(scheme=scheme, mitigation=mitigation, window=256)) is None


@pytest.mark.parametrize("scheme,mitigation", [("w8a8", "sink-fp:k=1000"), ("kv4", "smooth"), ("int8", "cushion")])
def test_eval_refuses_before_any_work(tmp_path, scheme, mitigation):
    result = runner.invoke(app, ["eval", "--scheme", scheme, "--mitigation", mitigation, "--window", "256",
                                 "--results", str(tmp_path / "runs"), "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_the_run_itself_refuses_a_k_beyond_the_window(tmp_path):
    from quantsink.pipeline.run import Session, prepare
    from quantsink.errors import UsageError

    with pytest.raises(UsageError, match="nothing would be quantized"):  # before the corpus or model is read
        prepare(RunConfig(model=str(tmp_path / "absent"), scheme="w8a8", mitigation="sink-fp:k=64", window=64),
                Session())
