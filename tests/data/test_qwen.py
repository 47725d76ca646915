"""Qwen2.5-Coder-0.5B, installed on demand: a real deployed model through the whole run (integration)."""

from __future__ import annotations

import pytest

from quantsink.data import install as inst


@pytest.mark.slow
def test_qwen_0_5b_scores_and_shows_its_token_0_sink(tmp_path):
    """Install (idempotent), de-quantize, score 2 x 256 tokens of stdlib code under w8a8-dyn: the reference
    ppl is that of a real code model (6.70 measured on argparse's first window), token 0 is the extreme token,
    and its massive activation (~860, measured) sits in the middle layers."""
    from quantsink import RunConfig, run

    inst.install("qwen2.5-coder-0.5b")
    config = RunConfig(model="qwen2.5-coder-0.5b", corpus="python-code", scheme="w8a8-dyn", window=256,
                       max_tokens=512, calib_windows=1, stats_windows=2, noise_floor=False, offline=True,
                       results=str(tmp_path))
    record = run(config).to_dict()
    assert 3.0 < record["reference"]["ppl"] < 12.0
    assert record["candidate"]["ppl"] > record["reference"]["ppl"]
    layers = record["stats"]["reference"]["layers"]
    peak = max(layers, key=lambda layer: layer["massive_activation"])
    assert peak["massive_position"] == 0 and 400 < peak["massive_activation"] < 2000
    assert record["stats"]["reference"]["extreme_tokens"]["windows_with_position"].get("0") == 2
