"""Paired t interval, noise floor and verdict (pure statistics), and their false-verdict rate."""

import math

import numpy as np
import pytest

from quantsink.measure.paired import (MIN_WINDOWS, false_verdict_rate, noise_floor, paired_t, ppl_delta, t_quantile, verdict)


def _windows(n=12, seed=0):
    rng = np.random.default_rng(seed)
    scored = rng.integers(200, 300, n)
    nll = scored * rng.uniform(2.0, 3.0, n)  # ~2-3 nats/token, varying by window
    return nll, scored


def test_identical_runs_give_zero_and_inconclusive():
    nll, n = _windows()
    res = paired_t(nll, nll, n)
    assert res["delta"] == 0.0 and res["ci"] == [0.0, 0.0]
    assert verdict(res["ci"], res["n_windows"]) == "inconclusive"


@pytest.mark.parametrize("shift,expected", [(-0.1, "helps"), (+0.1, "hurts")])
def test_planted_shift_gives_helps_or_hurts(shift, expected):
    nll, n = _windows()
    rng = np.random.default_rng(1)
    shifted = nll + n * (shift + rng.normal(0, 0.01, len(n)))  # shift nats/token +- small noise
    res = paired_t(nll, shifted, n)
    assert res["delta"] == pytest.approx(shift, abs=0.01)
    assert verdict(res["ci"], res["n_windows"]) == expected
    lo, hi = res["ci"]
    assert lo <= res["delta"] <= hi
    # a floor wider than the effect turns it into no verdict
    assert verdict(res["ci"], res["n_windows"], floor=0.2) == "inconclusive"


def test_interval_is_the_textbook_paired_t_for_equal_windows():
    rng = np.random.default_rng(5)
    a = rng.normal(500, 20, 10)
    x = rng.normal(1, 3, 10)
    res = paired_t(a, a + x, [250] * 10)
    half = t_quantile(9) * x.std(ddof=1) / math.sqrt(10) / 250
    assert res["ci"] == pytest.approx([x.mean() / 250 - half, x.mean() / 250 + half])
    assert t_quantile(9) == pytest.approx(2.262, abs=1e-3)


def test_ppl_delta_maps_nll_delta_exactly():
    nll, n = _windows()
    ppl_a = math.exp(nll.sum() / n.sum())
    assert ppl_delta(nll, n, 0.1) == pytest.approx(math.exp((nll.sum() + 0.1 * n.sum()) / n.sum()) - ppl_a)


def test_too_few_windows_is_insufficient_data_and_bad_shapes_refused():
    nll, n = _windows(n=MIN_WINDOWS - 1)
    res = paired_t(nll, nll - n, n)  # a huge, clean improvement
    assert verdict(res["ci"], res["n_windows"]) == "insufficient-data"
    assert verdict(res["ci"], res["n_windows"], min_windows=2) == "helps"
    assert paired_t([10.0], [5.0], [4])["ci"] == [-math.inf, math.inf]
    with pytest.raises(ValueError):
        paired_t([1.0, 2.0], [1.0], [1, 1])


def test_noise_floor_is_the_worst_case_mean_shift():
    assert noise_floor([10.0, 20.0], [11.0, 18.0], [5, 5]) == pytest.approx(3 / 10)
    assert noise_floor([1.0], [1.0], [3]) == 0.0


# ---------------------------------------------------------------- false-verdict rate on null deltas

SIMS = 20000
NULLS = {  # per-window differences whose true mean is 0, (S, N) nats per window
    "normal": lambda rng, s, n: rng.normal(0, 5, (s, n)),
    "t3 (heavy tails)": lambda rng, s, n: rng.standard_t(3, (s, n)) * 5,
    "laplace": lambda rng, s, n: rng.laplace(0, 5, (s, n)),
    "unequal windows": lambda rng, s, n: rng.normal(0, 1, (s, n)) * rng.uniform(0.2, 20, n),
}
MC = 3 * math.sqrt(0.05 * 0.95 / SIMS)  # Monte-Carlo error of a 5% rate (3 sigma)


@pytest.mark.parametrize("null", sorted(NULLS))
@pytest.mark.parametrize("n_windows", [4, 8, 16])
def test_false_verdict_rate_is_at_most_5_percent(null, n_windows):
    """Default settings (95% paired t, min 8 windows), no noise floor at all (the worst case)."""
    rng = np.random.default_rng(n_windows)
    deltas = NULLS[null](rng, SIMS, n_windows)
    rate = false_verdict_rate(deltas, np.full(n_windows, 255.0))
    assert rate <= 0.05 + MC
    if n_windows < MIN_WINDOWS:
        assert rate == 0.0  # insufficient-data, never helps/hurts


def test_float_noise_null_with_a_measured_floor_gives_almost_no_verdicts():
    """A float-level no-op: the null differences and the floor's no-op rerun share one noise scale."""
    rng = np.random.default_rng(7)
    deltas, noop = rng.normal(0, 5, (SIMS, 8)), rng.normal(0, 5, (SIMS, 8))
    floors = np.abs(noop).sum(1) / (8 * 255.0)
    assert false_verdict_rate(deltas, np.full(8, 255.0), floors=floors) < 0.005


def test_false_verdict_rate_matches_the_scalar_path():
    rng = np.random.default_rng(3)
    deltas, n = rng.normal(0, 5, (200, 8)), np.full(8, 255.0)
    base = np.full(8, 700.0)
    scalar = np.mean([verdict(paired_t(base, base + d, n)["ci"], 8) in ("helps", "hurts") for d in deltas])
    assert false_verdict_rate(deltas, n) == pytest.approx(scalar)
