"""Which mitigation verdicts changed between two leaderboards.

    python scripts/verdict_changes.py OLD_DIR NEW_DIR [--out results/NOTES-verdicts.md]

OLD_DIR holds schema-1 records (they stored ``mitigation_effect``: percentile bootstrap over 4
windows, fixed 0.1% margin); NEW_DIR the current records, whose verdicts ``quantsink.analysis.effects``
computes (paired t over windows, measured noise floor, ``min_windows``).  Cells are matched on
(model, corpus, scheme, mitigation).  Prints (or writes) a markdown table of every matched cell
with both verdicts, and a count of changes by (old -> new).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

from quantsink.report.leaderboard import leaderboard, read_results
from quantsink.report.rows import record_effects


def old_cells(directory: Path) -> dict[tuple[str, ...], dict[str, Any]]:
    cells = {}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        effect = data.get("mitigation_effect")
        if effect:
            config = data["config"]
            key = (config["model"], config["corpus"], config["scheme"], config["mitigation"])
            cells[key] = {"verdict": effect["verdict"], "delta_ppl": effect["delta_ppl"], "n": effect["n_windows"]}
    return cells


def new_cells(directory: Path) -> dict[tuple[str, ...], dict[str, Any]]:
    stored, _ = read_results(directory)
    found = record_effects(stored)
    _, records, _ = leaderboard(stored)  # the newest record per leaderboard row
    cells = {}
    for record in records:
        effect = found[record.run_id].mitigation_effect
        if effect:
            c = record.config
            cells[(c.model, c.corpus, c.scheme, c.mitigation)] = {
                "verdict": effect["verdict"], "delta_ppl": effect["delta_ppl"], "n": effect["n_windows"]}
    return cells


def table(old: dict, new: dict) -> str:
    lines = ["| model | corpus | scheme | mitigation | before (windows) | after (windows) |",
             "|---|---|---|---|---|---|"]
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        mark = "" if a["verdict"] == b["verdict"] else " **changed**"
        lines.append(f"| {' | '.join(key)} | {a['verdict']} {a['delta_ppl']:+.3g} ({a['n']}) | "
                     f"{b['verdict']} {b['delta_ppl']:+.3g} ({b['n']}){mark} |")
    counts = collections.Counter((old[k]["verdict"], new[k]["verdict"]) for k in set(old) & set(new))
    summary = [f"- {a} -> {b}: {n}" for (a, b), n in sorted(counts.items())]
    return "\n".join(summary + ["", *lines]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = table(old_cells(args.old), new_cells(args.new))
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
