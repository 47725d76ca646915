"""Extreme-token statistics: pure functions from tensors to numbers.

The paper's three phenomena (Guo et al. 2024, "Active-Dormant Attention Heads";
Sun et al. 2024, "Massive Activations"), per window, per layer and per head.
Nothing here touches a model: ``quantsink.hooks.sites`` gathers the tensors and calls
these functions.  Definitions (also written into every record under
``stats.protocol``):

* residual-state peak ratio: ``||h_0|| / median_{i>=1} ||h_i||``, ``h`` the
  residual stream after a decoder block, per window.
* massive activation: ``max |h|`` over positions and channels of a window, its
  (position, channel), and its ratio to the median ``|h|`` of that window.
  A token carries a massive activation (Sun et al.) when one of its values
  exceeds ``MASSIVE_VALUE`` (100) and ``MASSIVE_RATIO`` (1000) x the median ``|h|``,
  and the token stands out among the window's tokens: its largest ``|h|`` is at least
  ``MASSIVE_TOKEN_RATIO`` (10) x the median over tokens of their largest ``|h|``
  (in gemma3-270m's layers 1-3 most tokens carry a value ~1,000x the median ``|h|``:
  Sun's rule alone flags most tokens there).
* extreme tokens: positions whose residual norm exceeds ``k x`` the median norm
  of their window in at least one layer (default k = 50), or that carry a
  massive activation in at least one layer: found from the data.  (gemma3's BOS
  has a norm ratio of only ~26 but single values ~100,000, 1,000-7,600x the median.)
* sink score of a head: mean over queries ``i >= 1`` of the attention put on
  key 0 (``sink_score``) and on the detected extreme tokens (``extreme_score``).
* value-state drain of a KV head: ``||v_0|| / median_{i>=1} ||v_i||`` of the
  ``v_proj`` output (grouped-query models: per KV head).
* dormant query (Guo et al.): a query ``i >= 1`` whose attention on the sink
  (key 0) is at least ``tau`` (default 0.89, the paper's cutoff);
  ``dormant_fraction`` of a head = share of its queries, over all stats windows,
  that are dormant; the head is *dormant* when that share is at least ``share``
  (default 0.5), otherwise *active*.
* Linear inputs (what activation quantization sees): absmax, absmax with the
  extreme tokens left out, and the kurtosis of all input values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_K = 50.0
DEFAULT_TAU = 0.89  # a query is dormant when its attention on the sink is >= this (Guo et al.)
DEFAULT_SHARE = 0.5  # a head is dormant when at least this share of its queries is dormant
MASSIVE_VALUE = 100.0  # Sun et al.: a massive activation exceeds 100 ...
MASSIVE_RATIO = 1000.0  # ... and ~1000x the median magnitude
MASSIVE_TOKEN_RATIO = 10.0  # ... on a token that stands out: >= 10x the median of the tokens' largest |h|
TOP = 10  # entries kept in each `changes` list
STATS_VERSION = "3"  # bump when a change alters any recorded statistic


# --------------------------------------------------------------------------- residual stream


def token_norms(h: torch.Tensor) -> torch.Tensor:
    """L2 norm of each position's state.  (B, T, C) -> (B, T) float32"""
    return torch.linalg.vector_norm(h.float(), dim=-1)


def peak_ratio(norms: torch.Tensor) -> torch.Tensor:
    """``||h_0|| / median_{i>=1} ||h_i||`` per window.  (B, T) -> (B,)"""
    return norms[:, 0] / norms[:, 1:].median(dim=1).values


def massive_activation(h: torch.Tensor, sample: int = 64) -> dict[str, torch.Tensor]:
    """Largest ``|h|`` per window with its position and channel, the window's median ``|h|``,
    and which tokens carry a massive activation (:func:`massive_tokens`).

    The median is taken over every ``s``-th position (``s = T // sample``, at
    least 1; all channels): exact enough for a ratio of 10^2-10^4 and 10x cheaper.
    (B, T, C) -> dict of (B,) tensors: value, position, channel, median_abs; and tokens (B, T) bool.
    """
    a = h.float().abs()  # (B, T, C)
    tok_max, tok_chan = a.max(dim=-1)  # (B, T)
    value, position = tok_max.max(dim=1)  # (B,)
    channel = tok_chan.gather(1, position[:, None])[:, 0]  # (B,)
    step = max(1, h.shape[1] // sample)
    median = a[:, ::step].flatten(1).median(dim=1).values  # (B,)
    return {"value": value, "position": position, "channel": channel, "median_abs": median,
            "tokens": massive_tokens(tok_max, median)}


def massive_tokens(tok_max: torch.Tensor, median_abs: torch.Tensor, value: float = MASSIVE_VALUE,
                   ratio: float = MASSIVE_RATIO, token_ratio: float = MASSIVE_TOKEN_RATIO) -> torch.Tensor:
    """Tokens with a massive activation (Sun et al.): a value above ``value`` and ``ratio`` x the median
    ``|h|``, on a token whose largest ``|h|`` is ``token_ratio`` x the median of the tokens' largest ``|h|``.

    ``tok_max`` (B, T) largest ``|h|`` per token, ``median_abs`` (B,) -> (B, T) bool
    """
    typical = tok_max.median(dim=1, keepdim=True).values  # (B, 1)
    return (tok_max > value) & (tok_max >= ratio * median_abs[:, None]) & (tok_max >= token_ratio * typical)


def extreme_tokens(norms: torch.Tensor, k: float = DEFAULT_K) -> torch.Tensor:
    """Positions whose norm exceeds ``k x`` the window's median norm in any layer.

    (L, B, T) residual norms per layer -> (B, T) bool
    """
    median = norms.median(dim=-1, keepdim=True).values  # (L, B, 1)
    return (norms > k * median).any(dim=0)


# --------------------------------------------------------------------------- attention and values


def key_attention(probs: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives from the queries ``i >= 1``.  (B, H, T, T) -> (B, H, T)"""
    return probs[:, :, 1:, :].float().mean(dim=2)


def attention_on(key_attn: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean over queries i >= 1 of the attention put on a set of keys.

    ``key_attn`` (B, H, T) from :func:`key_attention`; ``keys`` (B, T) bool -> (B, H)
    """
    return (key_attn * keys[:, None, :].to(key_attn.dtype)).sum(-1)


def sink_score(probs: torch.Tensor) -> torch.Tensor:
    """Mean attention that queries ``i >= 1`` put on key 0.  (B, H, T, T) -> (B, H)"""
    return key_attention(probs)[..., 0]


def value_drain(v: torch.Tensor) -> torch.Tensor:
    """``||v_0|| / median_{i>=1} ||v_i||`` per KV head.  (B, T, KVH, D) -> (B, KVH)"""
    return value_drain_from_norms(torch.linalg.vector_norm(v.float(), dim=-1))  # (B, T, KVH)


def value_drain_from_norms(norms: torch.Tensor) -> torch.Tensor:
    """The same from value-vector norms.  (B, T, KVH) -> (B, KVH)"""
    return norms[:, 0] / norms[:, 1:].median(dim=1).values


def dormant_queries(probs: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Share of queries ``i >= 1`` whose attention on the sink (key 0) is >= ``tau``.  (B, H, T, T) -> (B, H)"""
    return (probs[:, :, 1:, 0] >= tau).float().mean(dim=-1)


def dormant(fraction: torch.Tensor, share: float = DEFAULT_SHARE) -> torch.Tensor:
    """A head is dormant when at least ``share`` of its queries are dormant.  (...) -> bool"""
    return fraction >= share


# --------------------------------------------------------------------------- Linear inputs


def token_absmax(x: torch.Tensor) -> torch.Tensor:
    """Largest ``|x|`` of each position.  (B, T, C) -> (B, T)"""
    return x.abs().amax(dim=-1).float()


def moments(x: torch.Tensor) -> torch.Tensor:
    """Power sums ``[n, sum x, sum x^2, sum x^3, sum x^4]`` as float64, mergeable across batches.

    (Accumulated in float32 within one tensor: relative error ~1e-5, plenty for a kurtosis.)
    """
    x = x.reshape(-1).float()  # (N,)
    x2 = x * x
    sums = torch.stack([x.sum(), x2.sum(), torch.dot(x2, x), torch.dot(x2, x2)]).double()
    return torch.cat([torch.tensor([float(x.numel())], dtype=torch.float64, device=sums.device), sums])


def kurtosis(sums: torch.Tensor) -> float:
    """Pearson kurtosis ``E[(x-mu)^4] / var^2`` (3 for a Gaussian) from :func:`moments` sums."""
    n, s1, s2, s3, s4 = (float(v) for v in sums)
    m1, m2, m3, m4 = s1 / n, s2 / n, s3 / n, s4 / n
    var = m2 - m1 * m1
    if var <= 0:
        return float("nan")
    central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
    return central4 / (var * var)


def absmax_without(tok_absmax: torch.Tensor, extreme: torch.Tensor) -> float:
    """Absmax over the positions that are not extreme tokens.  (B, T), (B, T) bool -> float"""
    rest = tok_absmax[~extreme]
    return float(rest.max()) if rest.numel() else float("nan")


# --------------------------------------------------------------------------- summaries


@dataclass
class WindowStats:
    """Per-window reductions of the stats windows (W windows, L layers, H heads, KVH KV heads)."""

    norm_sink: torch.Tensor  # (W, L) ||h_0||
    norm_median: torch.Tensor  # (W, L) median_{i>=1} ||h_i||
    massive: dict[str, torch.Tensor]  # value/position/channel/median_abs, each (W, L)
    extreme: list[list[int]]  # per window: extreme-token positions (norm ratio or massive activation)
    massive_positions: list[list[int]] = field(default_factory=list)  # per window: massive-activation tokens
    sink: torch.Tensor | None = None  # (W, L, H) attention on key 0
    extreme_attn: torch.Tensor | None = None  # (W, L, H) attention on the extreme tokens
    dormant_queries: torch.Tensor | None = None  # (W, L, H) share of queries >= tau on key 0
    drain: torch.Tensor | None = None  # (W, L, KVH)
    linear: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> absmax/absmax_wo/moments


def _r(x: float, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits (records stay small); NaN -> None."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _rows(t: torch.Tensor) -> list[list[float | None]]:
    return [[_r(v) for v in row] for row in t.tolist()]


def layer_profile(ws: WindowStats, share: float = DEFAULT_SHARE) -> list[dict[str, Any]]:
    """One dict per layer: peak ratio, massive activation, mean sink score, drain, dormant heads."""
    ratio = (ws.norm_sink / ws.norm_median).mean(0)  # (L,)
    value = ws.massive["value"]  # (W, L)
    best = value.argmax(0)  # (L,) window holding the largest activation
    out = []
    for layer in range(value.shape[1]):
        w = int(best[layer])
        row = {
            "layer": layer,
            "residual_peak_ratio": _r(ratio[layer]),
            "residual_norm_sink": _r(ws.norm_sink[:, layer].mean()),
            "residual_norm_median": _r(ws.norm_median[:, layer].mean()),
            "massive_activation": _r(value[w, layer]),
            "massive_position": int(ws.massive["position"][w, layer]),
            "massive_channel": int(ws.massive["channel"][w, layer]),
            "massive_ratio": _r(value[w, layer] / ws.massive["median_abs"][w, layer]),
            "massive_token": bool(massive_tokens(value[w:w + 1, layer:layer + 1],  # Sun's rule on the largest
                                                 ws.massive["median_abs"][w:w + 1, layer], token_ratio=0.0)),
        }
        if ws.sink is not None:
            row["sink_score"] = _r(ws.sink[:, layer].mean())
            row["dormant_heads"] = int(dormant(ws.dormant_queries[:, layer].mean(0), share).sum())
        if ws.drain is not None:
            row["value_drain"] = _r(ws.drain[:, layer].mean())
        out.append(row)
    return out


def head_tables(ws: WindowStats) -> dict[str, Any]:
    """Per head (layer x head) means over the stats windows (``dormant_fraction``: share of dormant queries)."""
    if ws.sink is None:
        heads: dict[str, Any] = {"sink_score": None, "extreme_score": None, "dormant_fraction": None}
    else:
        heads = {"sink_score": _rows(ws.sink.mean(0)), "extreme_score": _rows(ws.extreme_attn.mean(0)),
                 "dormant_fraction": _rows(ws.dormant_queries.mean(0)),
                 "dormant_per_window": [_rows(w) for w in ws.dormant_queries]}  # (W, L, H): the bootstrap's data
    heads["value_drain"] = _rows(ws.drain.mean(0)) if ws.drain is not None else None
    return heads


def linear_table(ws: WindowStats) -> dict[str, list[float | None]]:
    """site -> [absmax, absmax without extreme tokens, kurtosis]."""
    return {site: [_r(v["absmax"]), _r(v["absmax_without_extreme"]), _r(kurtosis(v["moments"]))]
            for site, v in ws.linear.items()}


def summarize(ws: WindowStats, *, k: float = DEFAULT_K, tau: float = DEFAULT_TAU,
              share: float = DEFAULT_SHARE, sink_positions: tuple[int, ...] = ()) -> dict[str, Any]:
    """The compact, JSON-ready stats of one model on the stats windows."""
    counts: dict[str, int] = {}
    for positions in ws.extreme:
        for p in positions:
            counts[str(p)] = counts.get(str(p), 0) + 1
    return {
        "protocol": protocol(k, tau, share, len(ws.extreme), sink_positions),
        "layers": layer_profile(ws, share),
        "heads": head_tables(ws),
        "extreme_tokens": {"k": k, "massive_value": MASSIVE_VALUE, "massive_ratio": MASSIVE_RATIO,
                           "massive_token_ratio": MASSIVE_TOKEN_RATIO,
                           "windows_with_position": counts, "per_window": ws.extreme,
                           "massive_per_window": ws.massive_positions},
        "linear_inputs": {"columns": ["absmax", "absmax_without_extreme", "kurtosis"],
                          "sites": linear_table(ws)},
    }


def protocol(k: float, tau: float, share: float, n_windows: int, sink_positions: tuple[int, ...]) -> dict[str, Any]:
    return {
        "windows": n_windows, "k": k, "tau": tau, "dormant_queries": share, "sink_positions": list(sink_positions),
        "stats_windows": "the first `windows` evaluation windows, in the same forward pass as the metrics, "
                         "whatever the attention kernel: eager (and quantsink's own) attention's weights are read "
                         "from its output, any other kernel keeps running and the probabilities are computed "
                         "beside it from the query and key it is given (hooks.probes); sliding-window layers: "
                         "queries beyond the window cannot see key 0",
        "residual": "output of each decoder block; peak ratio ||h_0|| / median_{i>=1} ||h_i||, mean over windows",
        "massive": "max |h| over positions and channels (largest window), ratio to that window's median |h| "
                   "(median over every (T//64)-th position, all channels)",
        "extreme_tokens": "positions with residual norm > k x the window's median norm in any layer, or with a "
                          "massive activation (one |h| > massive_value and >= massive_ratio x the window's "
                          "median |h|, Sun et al., on a token whose largest |h| is >= massive_token_ratio x "
                          "the median of the tokens' largest |h|) in any layer",
        "sink_score": "mean over queries i>=1 of attention on key 0, mean over windows",
        "extreme_score": "same, on the detected extreme tokens",
        "value_drain": "||v_0|| / median_{i>=1} ||v_i|| of v_proj's output, per KV head, mean over windows",
        "dormant": "a query i>=1 is dormant when its attention on key 0 is >= tau (Guo et al.: 0.89); "
                   "dormant_fraction = share of dormant queries over all stats windows; a head is dormant "
                   "when dormant_fraction >= dormant_queries; a head counts as woken (put to sleep) only when "
                   "the 95% percentile bootstrap interval over the stats windows (2,000 paired resamples, "
                   "seed 0) of its reference fraction lies at or above the threshold and the candidate's "
                   "below it (the reverse)",
        "linear_inputs": "absmax, absmax without extreme tokens, Pearson kurtosis of all values (3 = Gaussian)",
    }


# --------------------------------------------------------------------------- before / after


def _head_list(table: list[list[float | None]] | None) -> dict[tuple[int, int], float]:
    if not table:
        return {}
    return {(l, h): v for l, row in enumerate(table) for h, v in enumerate(row) if v is not None}


def _shifts(ref: dict[tuple[int, int], float], cand: dict[tuple[int, int], float],
            letter: str, top: int) -> list[dict[str, Any]]:
    keys = sorted(set(ref) & set(cand), key=lambda key: -abs(cand[key] - ref[key]))[:top]
    return [{"head": f"L{l}{letter}{h}", "reference": ref[(l, h)], "candidate": cand[(l, h)],
             "delta": _r(cand[(l, h)] - ref[(l, h)])} for l, h in keys]


def _dormancy_flips(ref: dict[str, Any], cand: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(woken, put to sleep): by the bootstrap intervals (``dormancy_shifts``) where both sides kept per-window
    dormant fractions, else by the point estimates."""
    share = ref["protocol"].get("dormant_queries", DEFAULT_SHARE)
    shifts = dormancy_shifts(ref, cand)
    if shifts is not None:
        return ([s["head"] for s in shifts if s["counted"] == "woken"],
                [s["head"] for s in shifts if s["counted"] == "put_to_sleep"])
    rd, cd = _head_list(ref["heads"]["dormant_fraction"]), _head_list(cand["heads"]["dormant_fraction"])
    common = sorted(set(rd) & set(cd))
    woken = [f"L{l}H{h}" for l, h in common if rd[(l, h)] >= share > cd[(l, h)]]
    slept = [f"L{l}H{h}" for l, h in common if cd[(l, h)] >= share > rd[(l, h)]]
    return woken, slept


BOOTSTRAP = 2000  # resamples of the stats windows for a head's dormant-fraction intervals (seed 0)


def bootstrap_means(ref: np.ndarray, cand: np.ndarray, resamples: int = BOOTSTRAP,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap means over windows, resampled in pairs (the same windows on both sides):
    ``ref``, ``cand`` (W, ...) -> their (resamples, ...) resampled means."""
    idx = np.random.default_rng(seed).integers(0, len(ref), (resamples, len(ref)))  # (B, W)
    return ref[idx].mean(1), cand[idx].mean(1)


def dormancy_shifts(ref: dict[str, Any], cand: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Heads whose dormant fraction crosses the threshold (point estimates), each with the 95% percentile
    bootstrap interval over the stats windows of the reference's, the candidate's and the shift's mean;
    ``counted``: ``woken`` (the reference's interval at or above the threshold, the candidate's below it),
    ``put_to_sleep`` (the reverse), or None (an interval straddles it).  None when a side kept no
    per-window fractions or their windows differ."""
    rw, cw = ref["heads"].get("dormant_per_window"), cand["heads"].get("dormant_per_window")
    if not rw or not cw or len(rw) != len(cw):
        return None
    r, c = np.asarray(rw, dtype=float), np.asarray(cw, dtype=float)  # (W, L, H)
    if r.shape != c.shape:
        return None
    share = ref["protocol"].get("dormant_queries", DEFAULT_SHARE)
    rb, cb = bootstrap_means(r, c)  # (B, L, H)
    rm, cm = r.mean(0), c.mean(0)
    out = []
    for layer, head in zip(*np.nonzero((rm >= share) != (cm >= share))):
        ri, ci, di = (np.percentile(x[:, layer, head], [2.5, 97.5]) for x in (rb, cb, cb - rb))
        counted = ("woken" if ri[0] >= share > ci[1] else "put_to_sleep" if ci[0] >= share > ri[1] else None)
        out.append({"head": f"L{layer}H{head}", "reference": _r(rm[layer, head]), "candidate": _r(cm[layer, head]),
                    "reference_ci95": [_r(x) for x in ri], "candidate_ci95": [_r(x) for x in ci],
                    "shift": _r(cm[layer, head] - rm[layer, head]), "shift_ci95": [_r(x) for x in di],
                    "counted": counted})
    return out


def _peak_shifts(ref: dict[str, Any], cand: dict[str, Any], top: int) -> list[dict[str, Any]]:
    def log_shift(a: dict[str, Any], b: dict[str, Any]) -> float:
        x, y = a.get("residual_peak_ratio"), b.get("residual_peak_ratio")
        return abs(math.log(y / x)) if x and y and x > 0 and y > 0 else -1.0

    pairs = sorted(zip(ref["layers"], cand["layers"]), key=lambda p: -log_shift(*p))[:top]
    return [{"layer": a["layer"], "reference": a["residual_peak_ratio"], "candidate": b["residual_peak_ratio"],
             "reference_massive": a["massive_activation"], "candidate_massive": b["massive_activation"],
             "massive_channel": [a["massive_channel"], b["massive_channel"]]} for a, b in pairs]


def changes(reference: dict[str, Any], candidate: dict[str, Any], top: int = TOP) -> dict[str, Any]:
    """What the candidate did to the extreme tokens, from two :func:`summarize` outputs.

    Heads *woken* are dormant in the reference (dormant fraction >= ``dormant_queries``) and
    active in the candidate; heads *put to sleep* the reverse.  Shifts are
    sorted by absolute change (peak ratios by absolute log ratio).  A candidate
    whose windows carry an extra prepended sink token has its positions shifted
    by ``position_offset``; key 0 is the first token of each side's windows.
    """
    woken, slept = _dormancy_flips(reference, candidate) if reference["heads"]["dormant_fraction"] \
        and candidate["heads"]["dormant_fraction"] else ([], [])
    rs, cs = _head_list(reference["heads"]["sink_score"]), _head_list(candidate["heads"]["sink_score"])
    rv, cv = _head_list(reference["heads"]["value_drain"]), _head_list(candidate["heads"]["value_drain"])
    deltas = [abs(cs[k] - rs[k]) for k in set(rs) & set(cs)]
    offset = (len(candidate["protocol"]["sink_positions"]) - len(reference["protocol"]["sink_positions"]))
    return {
        "position_offset": offset,
        "woken": woken,
        "put_to_sleep": slept,
        "dormancy_shifts": dormancy_shifts(reference, candidate),
        "mean_abs_sink_shift": _r(sum(deltas) / len(deltas)) if deltas else None,
        "sink_shifts": _shifts(rs, cs, "H", top),
        "drain_shifts": _shifts(rv, cv, "KV", top),
        "peak_shifts": _peak_shifts(reference, candidate, top),
    }


def domain_dependence(a: dict[str, Any], b: dict[str, Any], top: int = TOP) -> dict[str, Any]:
    """How one model's heads differ between two corpora (two summaries of the same model).

    ``heads``: the ``top`` heads by absolute sink-score difference; ``dormant_only_a``
    / ``dormant_only_b``: heads dormant (fraction >= ``dormant_queries``) on one corpus and active on
    the other -- the paper's active-dormant claim (dormant on Wikipedia, active on GitHub).
    """
    sa, sb = _head_list(a["heads"]["sink_score"]), _head_list(b["heads"]["sink_score"])
    da, db = _head_list(a["heads"]["dormant_fraction"]), _head_list(b["heads"]["dormant_fraction"])
    keys = sorted(set(sa) & set(sb), key=lambda key: abs(sa[key] - sb[key]), reverse=True)[:top]
    heads = [{"head": f"L{l}H{h}", "sink_a": sa[(l, h)], "sink_b": sb[(l, h)],
              "delta": _r(sb[(l, h)] - sa[(l, h)]), "dormant_a": da.get((l, h)), "dormant_b": db.get((l, h))}
             for l, h in keys]
    only_a, only_b = _dormancy_flips(a, b)  # (dormant on a, active on b), (the reverse)
    return {"heads": heads, "dormant_only_a": only_a, "dormant_only_b": only_b}
