"""Does the noise margin keep false verdicts <= 5%, and what power does it leave?  (issue 27)

    python scripts/noise_margin_sim.py [results/grid] [--sims 4000]

Reads the stored grid records as raw JSON (any schema) and prints markdown:

1. The stored float no-op pairs (each unmitigated activation/KV run and its noise-floor re-run): the
   pair's signed shift ``d``, its paired t standard error ``se`` and ``z = d / se``.  Their systematic
   part, relative to ``se``, is ``rho = sqrt(max(0, mean z^2 - 1))``.
2. A null simulation per stored cell: its per-window residuals resampled (heavy tails kept), a
   perturbation's shift ``s ~ N(0, (rho_sim se)^2)`` plus its resampled window noise, for the no-op
   pair and K = 3 draws; the margin ``t_K sqrt(mean d_k^2)`` (``paired.noise_margin``); a false
   verdict is an interval that clears the margin.  Also with the draws on a subset of the windows.
3. The stored no-op pairs against the plug-in margin ``t_3 se sqrt(rho^2 + N / M)`` (draws on M of N windows).
4. The power (and verdict at the observed effect) of every stored mitigation effect with that margin.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import t as student

from quantsink.measure.paired import noise_margin, t_quantile

K = 3


def load(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def pair_stats(a: list[float], b: list[float], n: list[int]) -> tuple[float, float, np.ndarray]:
    """(delta, se, residuals) of the paired ratio estimator of b - a (``paired.paired_t``)."""
    x, n_ = np.asarray(b) - np.asarray(a), np.asarray(n, dtype=float)
    d = x.sum() / n_.sum()
    r = x - d * n_
    return d, math.sqrt((r ** 2).sum() / (len(x) - 1)) * math.sqrt(len(x)) / n_.sum(), r


def noop_pairs(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        if r.get("noise_floor") and r["noise_floor"].get("nll_per_window"):
            c = r["candidate"]
            d, se, res = pair_stats(c["nll_per_window"], r["noise_floor"]["nll_per_window"], c["scored_per_window"])
            out.append({"cell": f'{r["config"]["model"][:6]} {r["config"]["corpus"]} {r["config"]["scheme"]}',
                        "d": d, "se": se, "res": res, "n": np.asarray(c["scored_per_window"], dtype=float)})
    return out


def simulate(pair: dict, rho: float, sims: int, rng: np.random.Generator, subset: int | None = None,
             windows: int | None = None) -> tuple[float, float]:
    """(false-verdict rate, mean margin / se) of one cell under the null."""
    res, n = pair["res"], pair["n"]
    m = windows or len(res)
    scale = pair["se"]

    def noise(count: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(res), (sims, count))
        r, nn = res[idx], n[idx]  # (S, M)
        e = r.sum(1) / nn.sum(1)
        resid = r - e[:, None] * nn
        se = np.sqrt((resid ** 2).sum(1) / (count - 1)) * math.sqrt(count) / nn.sum(1)
        return e, se

    e0, se0 = noise(m)
    s = rng.normal(0, rho * scale, (sims, K + 1))  # systematic shift per perturbation (nats: fixed as N grows)
    d0 = s[:, 0] + e0
    draws = np.stack([s[:, k] + noise(subset or m)[0] for k in range(1, K + 1)], 1)  # (S, K)
    margin = t_quantile(K) * np.sqrt((draws ** 2).mean(1))
    half = t_quantile(m - 1) * se0
    false = (d0 - half > margin) | (d0 + half < -margin)
    return float(false.mean()), float((margin / se0).mean())


def power(delta: float, se: float, df: int, margin: float) -> float:
    """P(the interval clears the margin on delta's side) for a true effect ``delta``."""
    return float(1 - student.cdf((margin + t_quantile(df) * se - abs(delta)) / se, df))


def plug_in(se: float, rho: float, share: float) -> float:
    """The margin expected from K draws on a ``share`` of the windows: ``t_K se sqrt(rho^2 + 1 / share)``."""
    return t_quantile(K) * se * math.sqrt(rho ** 2 + 1 / share)


def effects(records: list[dict], rho: float, share: float) -> list[str]:
    by_cell = {(r["config"]["model"], r["config"]["corpus"], r["config"]["scheme"], r["config"]["mitigation"]): r
               for r in records}
    lines = ["| model | corpus | scheme | mitigation | Δ nats/token | se | margin | verdict | power |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (model, corpus, scheme, mitigation), r in sorted(by_cell.items()):
        base = by_cell.get((model, corpus, scheme, "none"))
        if mitigation == "none" or base is None or base["candidate"]["nll_per_window"] == r["candidate"]["nll_per_window"]:
            continue
        n = base["candidate"]["scored_per_window"]
        d, se, _ = pair_stats(base["candidate"]["nll_per_window"], r["candidate"]["nll_per_window"], n)
        floor = base.get("noise_floor")
        if floor and floor.get("nll_per_window"):
            fse = pair_stats(base["candidate"]["nll_per_window"], floor["nll_per_window"], n)[1]
            margin = plug_in(fse, rho, share)
        else:
            margin = 0.0  # weight-only schemes: deterministic per token, no floor
        half = t_quantile(len(n) - 1) * se
        v = "helps" if d + half < -margin else "hurts" if d - half > margin else (
            "within-noise" if d + half < 0 or d - half > 0 else "inconclusive")
        lines.append(f"| {model} | {corpus} | {scheme} | {mitigation} | {d:+.4f} | {se:.4f} | {margin:.4f} | {v} | "
                     f"{power(d, se, len(n) - 1, margin):.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?", default="results/grid")
    ap.add_argument("--sims", type=int, default=4000)
    ap.add_argument("--draw-windows", type=int, default=8, help="windows each draw scores (of 16)")
    args = ap.parse_args()
    records = load(Path(args.results))
    pairs = noop_pairs(records)
    z = np.array([p["d"] / p["se"] for p in pairs])
    rho = math.sqrt(max(0.0, float((z ** 2).mean()) - 1))
    plain = int((np.abs(z) > t_quantile(15)).sum())
    print(f"## Stored float no-op pairs: {len(pairs)}; plain t gives a verdict on {plain}; "
          f"mean z^2 = {(z ** 2).mean():.2f}, rho = {rho:.2f}\n")
    rng = np.random.default_rng(0)
    print("## Null simulation: false helps/hurts per cell (max and mean over the stored cells), K = 3 draws\n")
    print("| rho_sim | windows | draws on | max false | mean false | mean margin/se |")
    print("|---|---|---|---|---|---|")
    for rho_sim in sorted({0.0, 0.5, round(rho, 2), 1.0, 2.0, 4.0, 8.0}):
        for windows, subset in ((16, None), (16, 8), (16, 4), (64, None), (128, None)):
            rates = [simulate(p, rho_sim, args.sims, rng, subset, windows) for p in pairs]
            false, ratio = zip(*rates)
            print(f"| {rho_sim} | {windows} | {subset or windows} | {max(false):.3f} | {np.mean(false):.3f} | "
                  f"{np.mean(ratio):.2f} |")
    share = args.draw_windows / 16
    print(f"\n## Stored no-op pairs against the plug-in margin t_3 se sqrt(rho^2 + 16/{args.draw_windows})\n")
    hits = [p for p in pairs if abs(p["d"]) - t_quantile(15) * p["se"] > plug_in(p["se"], rho, share)]
    print(f"{len(hits)} of {len(pairs)} get helps/hurts ({', '.join(p['cell'] for p in hits) or 'none'})\n")
    print("## Stored mitigation effects with that margin: verdict and power at the observed effect\n")
    table = effects(records, rho, share)
    print("\n".join(table))
    verdicts = [line.split("|")[8].strip() for line in table[2:]]
    powers = [float(line.split("|")[9]) for line in table[2:]]
    print(f"\n{len(verdicts)} effects: " + ", ".join(f"{v} {verdicts.count(v)}" for v in sorted(set(verdicts)))
          + f"; median power {np.median(powers):.2f}, power >= 0.8 on {sum(p >= 0.8 for p in powers)}")


if __name__ == "__main__":
    main()
