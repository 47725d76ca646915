"""testbed train: --out on a file and a corrupt checkpoint are one line, before any training (issue 31, 11)."""

from __future__ import annotations

import pytest

from quantsink.errors import QuantsinkError, UsageError
from quantsink.testbed.train import TrainConfig, train

TINY = dict(d=32, seq_len=32, batch=4, eval_every=2, probe_batch=4, heldout=3, precision="float32", device="cpu",
            steps=2)


def test_out_on_an_existing_file_is_refused(tmp_path):
    out = tmp_path / "model.pt"
    out.write_text("not a folder")
    with pytest.raises(UsageError, match="is a file, not a folder") as err:
        train(TrainConfig(out=str(out), **TINY))
    assert "\n" not in str(err.value) and out.read_text() == "not a folder"


@pytest.mark.parametrize("state", ["{truncated", '{"step": 1}'])
def test_a_corrupt_checkpoint_is_one_line(tmp_path, state):
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(state)
    with pytest.raises(QuantsinkError, match="corrupt checkpoint") as err:
        train(TrainConfig(out=str(tmp_path / "run"), **TINY))
    assert "\n" not in str(err.value)
