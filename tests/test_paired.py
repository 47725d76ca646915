"""Paired bootstrap and verdict (pure statistics)."""

import math

import numpy as np
import pytest

from quantsink.paired import paired_delta, per_token_stat, ppl_stat, verdict


def _windows(n=12, seed=0):
    rng = np.random.default_rng(seed)
    scored = rng.integers(200, 300, n)
    nll = scored * rng.uniform(2.0, 3.0, n)  # ~2-3 nats/token, varying by window
    return nll, scored


def test_identical_runs_give_zero_and_inconclusive():
    nll, n = _windows()
    res = paired_delta(nll, nll, n, ppl_stat, seed=0, resamples=500)
    assert res["delta"] == 0.0 and res["ci95"] == [0.0, 0.0]
    assert verdict(res["ci95"], res["n_windows"]) == "inconclusive"


@pytest.mark.parametrize("shift,expected", [(-0.1, "helps"), (+0.1, "hurts")])
def test_planted_shift_gives_helps_or_hurts(shift, expected):
    nll, n = _windows()
    rng = np.random.default_rng(1)
    shifted = nll + n * (shift + rng.normal(0, 0.01, len(n)))  # shift nats/token +- small noise
    res = paired_delta(nll, shifted, n, ppl_stat, seed=3, resamples=1000)
    assert math.copysign(1, res["delta"]) == math.copysign(1, shift)
    assert verdict(res["ci95"], res["n_windows"]) == expected
    lo, hi = res["ci95"]
    assert lo <= res["delta"] <= hi


def test_noise_without_shift_is_inconclusive():
    nll, n = _windows(n=20)
    rng = np.random.default_rng(2)
    noisy = nll + n * rng.normal(0, 0.2, len(n))  # large per-window noise, mean ~0
    res = paired_delta(nll, noisy - (noisy - nll).mean(), n, ppl_stat, seed=0, resamples=1000)
    assert verdict(res["ci95"], res["n_windows"]) == "inconclusive"


def test_seeded_and_recorded():
    nll, n = _windows()
    other = nll * 1.01
    a = paired_delta(nll, other, n, per_token_stat, seed=7, resamples=300)
    b = paired_delta(nll, other, n, per_token_stat, seed=7, resamples=300)
    c = paired_delta(nll, other, n, per_token_stat, seed=8, resamples=300)
    assert a == b and a["ci95"] != c["ci95"]
    assert a["resamples"] == 300 and a["seed"] == 7
    assert a["delta"] == pytest.approx((other.sum() - nll.sum()) / n.sum())


def test_one_window_is_inconclusive_and_bad_shapes_refused():
    res = paired_delta([10.0], [5.0], [4], ppl_stat, seed=0, resamples=50)
    assert verdict(res["ci95"], res["n_windows"]) == "inconclusive"
    with pytest.raises(ValueError):
        paired_delta([1.0, 2.0], [1.0], [1, 1], ppl_stat, seed=0)
