"""Verdicts on real passes (tiny model): a no-op mitigation is never helps/hurts; the noise floor is recorded."""

from __future__ import annotations

import json

import pytest

from quantsink.config import RunConfig
from quantsink.measure.paired import noise_margin
from quantsink.pipeline.execute import run_config


def _config(tiny_model_dir, tiny_text_file, tmp_path, **changes):
    base = RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", window=32, max_tokens=8 * 32,
                     calib_windows=1, stats=False, device="cpu", results=str(tmp_path))
    return base.replace(**changes)


@pytest.mark.parametrize("scheme,mitigation,expected", [
    ("w8a8-dyn", "clip-residual:max=1e30", {"not-applicable"}),  # clips nothing: bit-identical
])
def test_a_no_op_mitigation_is_never_helps_or_hurts(tiny_model_dir, tiny_text_file, tmp_path, scheme, mitigation,
                                                    expected):
    _, effects = run_config(_config(tiny_model_dir, tiny_text_file, tmp_path, scheme=scheme, mitigation=mitigation))
    effect = effects.mitigation_effect
    assert effect["n_windows"] == 8 and effect["verdict"] in expected, effect
    assert effect["noise_floor_measured"] and effect["noise_floor_nats"] >= 0
    stored = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    base = next(r for r in stored if r["config"]["mitigation"] == "none")
    floor = base["noise_floor"]
    draws = floor["draws"]
    assert [d["perturbation"] for d in draws] == ["kernel", "jitter:1", "jitter:2"]
    assert all(len(d["nll_per_window"]) == 8 and d["shift_kl"] is not None for d in draws)
    assert floor["nats_per_token"] == pytest.approx(noise_margin([d["shift_nats"] for d in draws]))
    assert floor["nats_per_token"] >= max(abs(d["shift_nats"]) for d in draws)
    assert floor["nats_per_token"] == pytest.approx(effect["noise_floor_nats"])
    assert base["candidate"]["kl_percentiles"]["max"] >= base["candidate"]["kl_percentiles"]["p99"] > 0


def test_no_floor_and_few_windows_are_stated(tiny_model_dir, tiny_text_file, tmp_path):
    config = _config(tiny_model_dir, tiny_text_file, tmp_path, scheme="w8a8-dyn", mitigation="sink-fp",
                     noise_floor=False, max_tokens=4 * 32)
    effect = run_config(config, write=False)[1].mitigation_effect
    assert effect["verdict"] == "insufficient-data" and effect["min_windows"] == 8
    assert not effect["noise_floor_measured"] and effect["noise_floor_nats"] == 0.0
