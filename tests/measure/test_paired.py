"""Paired t interval, noise floor and verdict (pure statistics), and their false-verdict rate."""

import math

import numpy as np
import pytest

from quantsink.measure.paired import (MIN_WINDOWS, clustered_t, false_verdict_rate, mde, noise_floor, noise_margin,
                                      paired_t, ppl_delta, ratio_t, t_quantile, verdict)


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
    # a margin wider than the effect: significant, but within the noise
    assert verdict(res["ci"], res["n_windows"], floor=0.2) == "within-noise"


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


def test_clustered_interval_with_one_window_per_document_is_the_paired_t():
    rng = np.random.default_rng(11)
    nll, n = _windows(n=14, seed=3)
    other = nll + n * rng.normal(0.02, 0.05, len(n))
    plain, clustered = paired_t(nll, other, n), clustered_t(nll, other, n, clusters=list(range(30, 44)))
    assert clustered["delta"] == plain["delta"]
    assert clustered["ci"] == pytest.approx(plain["ci"], rel=1e-12, abs=1e-15)
    assert clustered["n_clusters"] == 14 and clustered["df"] == 13


def test_clustered_interval_widens_when_a_document_shares_its_shift():
    # two windows per document, each document with its own shift: clustering sees 8 units, not 16
    rng = np.random.default_rng(2)
    n = np.full(16, 255)
    doc_shift = np.repeat(rng.normal(0, 0.05, 8), 2)
    a = n * 2.5
    b = a + n * (doc_shift + rng.normal(0, 0.005, 16))
    docs = np.repeat(np.arange(8), 2)
    plain, clustered = paired_t(a, b, n), clustered_t(a, b, n, clusters=docs)
    assert clustered["df"] == 7 and plain["delta"] == pytest.approx(clustered["delta"])
    assert clustered["ci"][1] - clustered["ci"][0] > 1.3 * (plain["ci"][1] - plain["ci"][0])
    # by hand: residual sums per document, G/(G-1) correction, t with G-1 df
    x = b - a
    r = np.bincount(docs, weights=x - clustered["delta"] * n)
    se = math.sqrt(8 / 7 * (r ** 2).sum()) / n.sum()
    assert clustered["se"] == pytest.approx(se, rel=1e-12)


def test_ratio_interval_of_one_cluster_is_infinite_and_bad_clusters_refused():
    assert ratio_t([1.0, 2.0], [10, 10], clusters=[0, 0])["ci"] == [-math.inf, math.inf]
    with pytest.raises(ValueError, match="cluster ids"):
        ratio_t([1.0, 2.0], [10, 10], clusters=[0])


def test_noise_margin_bounds_every_draw_and_is_the_prediction_bound():
    shifts = [-0.004, 0.044, 0.01]
    margin = noise_margin(shifts)
    assert margin >= max(abs(d) for d in shifts)
    assert margin == pytest.approx(t_quantile(3) * math.sqrt(np.mean(np.square(shifts))))
    assert noise_margin([]) == 0.0


def test_noise_margin_gives_five_percent_false_verdicts_on_zero_centred_draws():
    # the no-op and the three draws are exchangeable N(0, s^2) shifts: P(|d_0| > margin) = 5%
    rng = np.random.default_rng(7)
    d = rng.normal(0, 0.02, (4000, 4))
    margins = np.array([noise_margin(row[1:]) for row in d[:4000]])
    assert abs(float((np.abs(d[:4000, 0]) > margins).mean()) - 0.05) < 0.015


def test_mde_is_the_effect_found_at_the_stated_power():
    from scipy.stats import t

    se, df, margin = 0.01, 15, 0.02
    effect = mde(se, df, margin)
    # a true effect of mde clears the margin with probability 0.8 (t approximation of the interval's end)
    assert 1 - t.cdf((margin + t_quantile(df) * se - effect) / se, df) == pytest.approx(0.8, abs=1e-9)
    assert mde(math.inf, 0, 0.0) == math.inf


def test_within_noise_needs_a_significant_interval_inside_the_margin():
    assert verdict([-0.05, -0.01], 16, floor=0.03) == "within-noise"
    assert verdict([0.01, 0.05], 16, floor=0.03) == "within-noise"
    assert verdict([-0.05, 0.01], 16, floor=0.03) == "inconclusive"
    assert verdict([-0.09, -0.04], 16, floor=0.03) == "helps"
    assert verdict([-0.09, -0.04], 16) == "helps"  # no margin: never within-noise
