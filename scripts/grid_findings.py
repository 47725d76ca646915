"""The tables results/NOTES.md quotes, computed from the stored records.

    python scripts/grid_findings.py [results/grid]

Prints markdown: (1) per (model, corpus, scheme) the unmitigated ppl, the ppl with the sink kept in
full precision and d_sink with its paired t interval (issue 15's questions: is FP8 per tensor as
fragile to the sink as INT8 per tensor; does NVFP4's 16-element group make sink-fp unnecessary?);
(2) per (model, corpus, scheme) the mitigation with the lowest ppl (whatever its verdict; the report's star
marks the best one that *helps*) and every mitigation's verdict (issue 16).  Only the records behind the
leaderboard's rows count (the newest per model, corpus, protocol, scheme and mitigation).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from quantsink.report.leaderboard import leaderboard, read_results
from quantsink.report.rows import record_effects


def sink_table(records: list, found: dict) -> list[str]:
    lines = ["| model | corpus | scheme | ref ppl | none | sink-fp | d_sink nats/token [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r.config.model, r.config.corpus, r.config.scheme)):
        sink = found[r.run_id].d_sink
        if r.config.mitigation != "none" or not sink:
            continue
        lo, hi = sink["ci95"]
        lines.append(f"| {r.config.model} | {r.config.corpus} | {r.config.scheme} | {r.reference.ppl:.2f} | "
                     f"{sink['full_ppl']:.2f} | {sink['sink_fp_ppl']:.2f} | "
                     f"{sink['nats_per_token']:.3f} [{lo:.3f}, {hi:.3f}] |")
    return lines


def winners(records: list, found: dict) -> list[str]:
    cells: dict[tuple[str, str, str], list] = defaultdict(list)
    for r in records:
        cells[(r.config.model, r.config.corpus, r.config.scheme)].append(r)
    lines = ["| model | corpus | scheme | none | lowest ppl (verdict) | verdicts of the others |", "|---|---|---|---|---|---|"]
    for key in sorted(cells):
        runs = cells[key]
        base = next((r for r in runs if r.config.mitigation == "none"), None)
        mitigated = sorted((r for r in runs if r.config.mitigation != "none"), key=lambda r: r.candidate.ppl)
        if base is None or not mitigated:
            continue
        def label(r) -> str:  # noqa: E306 - local formatter
            effect = found[r.run_id].mitigation_effect or {}
            return f"{r.config.mitigation} {r.candidate.ppl:.2f} {effect.get('verdict', '?')}"
        lines.append(f"| {' | '.join(key)} | {base.candidate.ppl:.2f} | {label(mitigated[0])} | "
                     f"{'; '.join(label(r) for r in mitigated[1:])} |")
    return lines


def main() -> None:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "results/grid")
    stored, _ = read_results(directory)
    found = record_effects(stored)
    _, records, _ = leaderboard(stored)  # one record per row of the leaderboard
    print("\n".join(["## Sink damage per scheme (d_sink)", "", *sink_table(records, found), "",
                     "## Best mitigation per scheme", "", *winners(records, found)]))


if __name__ == "__main__":
    main()
