"""The leaderboard's first view: which mitigation helps which scheme, and which scheme hurts least.

Pure functions over leaderboard rows (``report.row`` dicts), nothing recomputed:

* ``matrices``: per (model, corpus, protocol, settings), a scheme x mitigation matrix (schemes with at least
  one mitigated run) whose cells are
  the mitigation's effect (``effects.mitigation_effect``: Δppl, mitigated minus the
  unmitigated scheme, paired t 95% interval over windows) and its verdict; the best
  mitigation of a scheme is the one with the lowest Δppl among those whose verdict is
  ``helps`` (none is marked when no mitigation helps).
* ``ranking``: the unmitigated schemes of each (model, corpus, protocol, settings) by perplexity ratio
  to the reference (lower is better), real kernels and simulated ones ranked apart, with their bits
  (``W8A8KV32``) and the best mitigation.

A cell also carries ``recovered``: the share of the scheme's damage the mitigation recovered,
``-Δppl / (ppl_unmitigated - ppl_reference)`` (1 = back to the reference, 0 = no change, < 0 = worse),
comparable across models whose perplexities differ tenfold.  Every matrix lists the mitigations in
one order (``matrices``: most helps over all matrices first, then by name).

``settings`` (the leaderboard's: the identity fields in which its records differ, e.g. ``calib_windows=4``)
is part of every group, so a cell and its scheme's baseline always come from runs with the same settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

VERDICT_ORDER = ("helps", "inconclusive", "hurts", "insufficient-data", "not-applicable")
MATRIX_CSV = ("model", "corpus", "protocol", "settings", "scheme", "mitigation", "delta_ppl", "ci_low", "ci_high",
              "recovered", "verdict", "best", "run_id")


@dataclass
class Cell:
    verdict: str | None
    delta_ppl: float | None
    ci: tuple[float, float] | None
    run_id: str
    best: bool = False
    recovered: float | None = None  # -Δppl / the unmitigated scheme's ppl increase over the reference


@dataclass
class Matrix:
    """One (model, corpus, protocol, settings): scheme rows, mitigation columns, cells by (scheme, mitigation)."""

    model: str
    corpus: str
    protocol: str
    settings: str = ""
    schemes: list[str] = field(default_factory=list)
    mitigations: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # scheme -> its unmitigated row

    @property
    def title(self) -> str:
        return " · ".join(x for x in (self.model, self.corpus, self.settings) if x)

    def best(self, scheme: str) -> str | None:
        return next((m for m in self.mitigations if self.cells.get((scheme, m)) and self.cells[(scheme, m)].best),
                    None)


def _group(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["corpus"], r["protocol"], r.get("settings") or ""), []).append(r)
    return groups


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def recovered(delta_ppl: float | None, baseline: dict[str, Any] | None) -> float | None:
    """The share of the scheme's damage a mitigation recovered: ``-Δppl / (ppl - ppl_ref)`` of the unmitigated
    run (None without a damage to share: no baseline, or a scheme no worse than the reference)."""
    base = baseline or {}
    damage = (_finite(base.get("ppl")) or math.nan) - (_finite(base.get("ppl_ref")) or math.nan)
    return round(-delta_ppl / damage, 4) + 0.0 if delta_ppl is not None and damage > 0 else None  # (no -0%)


def matrix(key: tuple[str, ...], rows: list[dict[str, Any]]) -> Matrix:
    out = Matrix(*key)
    for r in sorted(rows, key=lambda r: r["mitigation"] != "none"):  # baselines first
        if r["mitigation"] == "none":
            out.baseline[r["scheme"]] = r
        elif r["verdict"]:
            delta = _finite(r["effect"])
            out.cells[(r["scheme"], r["mitigation"])] = Cell(r["verdict"], delta, r["effect_ci"], r["run_id"],
                                                             recovered=recovered(delta, out.baseline.get(r["scheme"])))
    out.schemes = sorted({s for s, _ in out.cells},
                         key=lambda s: (_finite((out.baseline.get(s) or {}).get("ppl_ratio")) or math.inf, s))
    helped = {m: sum(c.verdict == "helps" for (_, mm), c in out.cells.items() if mm == m) for _, m in out.cells}
    out.mitigations = sorted(helped, key=lambda m: (-helped[m], m))
    for scheme in out.schemes:
        _mark_best(out, scheme)
    return out


def _mark_best(m: Matrix, scheme: str) -> None:
    helps = [c for (s, _), c in m.cells.items() if s == scheme and c.verdict == "helps" and c.delta_ppl is not None]
    if helps:
        min(helps, key=lambda c: c.delta_ppl).best = True


def matrices(rows: Iterable[dict[str, Any]]) -> list[Matrix]:
    """Every (model, corpus, protocol, settings) that has at least one mitigated run with a verdict."""
    found = [m for m in (matrix(key, part) for key, part in _group(rows).items()) if m.cells]
    helped: dict[str, int] = {}
    for m in found:
        for (_, mitigation), cell in m.cells.items():
            helped[mitigation] = helped.get(mitigation, 0) + (cell.verdict == "helps")
    order = sorted(helped, key=lambda x: (-helped[x], x))  # one column order for every panel
    for m in found:
        m.mitigations = [x for x in order if x in m.mitigations]
    return found


def ranking(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unmitigated schemes by ppl ratio within each (model, corpus, protocol, settings), real kernels first and
    ranked apart from simulated ones (``rank`` restarts), with the best mitigation."""
    out = []
    for key, part in _group(rows).items():
        m = matrix(key, part)
        base = sorted(m.baseline.values(),
                      key=lambda r: (bool(r["simulated"]), _finite(r["ppl_ratio"]) or math.inf, r["scheme"]))
        for i, r in enumerate(base):
            rank = 1 + sum(b["simulated"] == r["simulated"] for b in base[:i])
            best = m.best(r["scheme"])
            cell = m.cells.get((r["scheme"], best)) if best else None
            out.append({"model": r["model"], "corpus": r["corpus"], "protocol": r["protocol"],
                        "settings": m.settings, "rank": rank,
                        "scheme": r["scheme"], "bits": r["bits"], "kernels": "simulated" if r["simulated"] else "real",
                        "ppl": r["ppl"], "ppl_ratio": r["ppl_ratio"], "kl": r["kl"], "best_mitigation": best,
                        "best_delta_ppl": cell.delta_ppl if cell else None, "run_id": r["run_id"]})
    return out


def matrix_rows(ms: list[Matrix]) -> list[dict[str, Any]]:
    """The matrices in long form (one row per cell): the CSV and JSON carry these."""
    return [{"model": m.model, "corpus": m.corpus, "protocol": m.protocol, "settings": m.settings, "scheme": s, "mitigation": mit,
             "delta_ppl": c.delta_ppl, "ci_low": c.ci[0] if c.ci else None, "ci_high": c.ci[1] if c.ci else None,
             "recovered": c.recovered, "verdict": c.verdict, "best": c.best, "run_id": c.run_id}
            for m in ms for s in m.schemes for mit in m.mitigations if (c := m.cells.get((s, mit)))]


def cell_text(cell: Cell | None, digits: int = 3) -> str:
    """``-12.1 (80%) helps ★``: Δppl, the share of the damage recovered, the verdict (``n/a`` for
    not-applicable, empty when there is no run)."""
    if cell is None:
        return ""
    if cell.verdict == "not-applicable":
        return "n/a"
    value = "" if cell.delta_ppl is None else f"{_signed(cell.delta_ppl, digits)} "
    share = "" if cell.recovered is None else f"({cell.recovered:.0%}) "
    return f"{value}{share}{cell.verdict}" + (" ★" if cell.best else "")


def _signed(value: float, digits: int) -> str:
    """``+1.23`` / ``-12`` / ``±0`` (a delta below 5e-4 in magnitude reads as zero)."""
    return "±0" if abs(value) < 5e-4 else f"{value:+.{digits}g}"
