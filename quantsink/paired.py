"""Paired statistics over windows: does a change to the candidate help?

Pure functions (arrays in, numbers out); nothing here runs a model.

Two passes over the *same* windows give per-window sums: summed NLL (nats),
scored-token count, summed KL.  A statistic of a pass is a ratio of sums, e.g.
``ppl = exp(sum NLL / sum scored)``.  The paired bootstrap resamples *windows*
with replacement, the same indices for both passes, ``resamples`` times from a
seeded generator, and takes the 2.5th and 97.5th percentiles of the resampled
difference as the 95% confidence interval (percentile bootstrap).  Windows,
not tokens, are the unit: tokens within a window are not independent.

Verdict on ``delta = mitigated - unmitigated`` of a lower-is-better metric:
``helps`` when the whole CI is below 0, ``hurts`` when it is above 0,
``inconclusive`` otherwise (or with fewer than 2 windows, where a bootstrap
says nothing); optionally a ``negligible`` margin around 0 that the CI must clear.  With few windows the percentile CI is optimistic (too narrow).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
Stat = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (R, N) sums, (R, N) counts -> (R,)


def ppl_stat(nll: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Token perplexity of each resample row: exp(sum NLL / sum scored)."""
    return np.exp(nll.sum(-1) / n.sum(-1))


def per_token_stat(total: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Mean per scored token of each resample row (NLL or KL, nats/token)."""
    return total.sum(-1) / n.sum(-1)


def _resample_index(n_windows: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, n_windows, size=(resamples, n_windows))  # (R, N)


def paired_delta(a: Sequence[float], b: Sequence[float], n_scored: Sequence[int], stat: Stat, *,
                 seed: int, resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """``stat(b) - stat(a)`` over the same windows, with a paired-bootstrap 95% CI.

    ``a``, ``b``: per-window sums of the two passes (N,); ``n_scored``: the
    per-window scored-token counts they share (N,).
    """
    a_, b_, n_ = (np.asarray(x, dtype=np.float64) for x in (a, b, n_scored))
    if not (a_.shape == b_.shape == n_.shape) or a_.ndim != 1 or len(a_) == 0:
        raise ValueError("paired_delta needs equal-length, non-empty per-window arrays")
    delta = float(stat(b_[None], n_[None])[0] - stat(a_[None], n_[None])[0])
    idx = _resample_index(len(a_), resamples, seed)  # (R, N)
    boot = stat(b_[idx], n_[idx]) - stat(a_[idx], n_[idx])  # (R,)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"delta": delta, "ci95": [float(lo), float(hi)], "resamples": resamples, "seed": seed,
            "n_windows": len(a_), "method": "paired percentile bootstrap over windows"}


def verdict(ci95: Sequence[float], n_windows: int, negligible: float = 0.0) -> str:
    """``helps`` / ``hurts`` / ``inconclusive`` for a lower-is-better delta's CI.

    ``negligible`` >= 0: a CI entirely within ``[-negligible, +negligible]`` of 0 on
    the wrong side still says nothing useful (e.g. float rounding): helps needs
    ``hi < -negligible``, hurts needs ``lo > negligible``.
    """
    lo, hi = ci95
    if n_windows < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if hi < -negligible:
        return "helps"
    if lo > negligible:
        return "hurts"
    return "inconclusive"
