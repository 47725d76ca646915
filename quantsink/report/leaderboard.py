"""Leaderboard: every record in a results directory -> md, csv, json and one self-contained html.

Reads ``RunRecord``s only (``results.iter_records``: validated against the schema); the rows and their derived
numbers are :mod:`quantsink.report.rows`', the figures :mod:`quantsink.report.figures`', the page
:mod:`quantsink.report.page`'s.  Markdown cells are escaped; results are written atomically."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from quantsink.errors import QuantsinkError
from quantsink.records.schema import RunRecord
from quantsink.report.figures import plots
from quantsink.report.matrix import MATRIX_CSV, Matrix, cell_text, matrices, matrix_rows, ranking
from quantsink.report.page import to_html
from quantsink.report.rows import (COLUMNS, MARKDOWN, as_number, environment_notes, failure_label, fmt,
    leaderboard, md_escape, row)


def to_markdown(frame: Any, failures: list[dict[str, Any]], notes: Iterable[str] = ()) -> str:
    protocols = sorted(set(frame["protocol"])) if len(frame) else []
    lines = [f"Protocol: {md_escape('; '.join(protocols))}" if protocols else "No records.", ""]
    lines += [f"Environment: {md_escape(note)}" for note in notes] + ([""] if notes else [])
    rows = frame.to_dict(orient="records") if len(frame) else []
    lines += matrix_markdown(matrices(rows)) + ranking_markdown(ranking(rows))
    headers = [COLUMNS[c][0] for c in MARKDOWN]
    lines += ["**All runs**", "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(md_escape(fmt(r[c], COLUMNS[c][1])) for c in MARKDOWN) + " |")
    if failures:
        lines += ["", f"Failed runs ({len(failures)}):", ""]
        lines += [f"- {md_escape(failure_label(f))}: {md_escape(str(f.get('error', '')))}" for f in failures]
    return "\n".join(lines) + "\n"


def matrix_markdown(ms: list[Matrix]) -> list[str]:
    """Per model and corpus: scheme x mitigation, Δppl vs the unmitigated scheme and the verdict (★ best)."""
    lines = []
    for m in ms:
        head = ["scheme", "ppl ×ref", *m.mitigations]
        lines += [f"**Which mitigation helps: {md_escape(m.title)}** (Δppl vs the unmitigated scheme, "
                  f"paired t 95% interval over windows; ★ best that helps)", "",
                  "| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for scheme in m.schemes:
            ratio = fmt(as_number((m.baseline.get(scheme) or {}).get("ppl_ratio")), 4)
            cells = [cell_text(m.cells.get((scheme, mit))) for mit in m.mitigations]
            lines.append("| " + " | ".join(md_escape(c) for c in (scheme, ratio, *cells)) + " |")
        lines.append("")
    return lines


def ranking_markdown(rank: list[dict[str, Any]]) -> list[str]:
    if not rank:
        return []
    head = ["model", "corpus", "rank", "scheme", "bits", "kernels", "ppl ×ref", "KL", "best mitigation"]
    lines = ["**Schemes ranked by perplexity ratio** (unmitigated)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rank:
        best = f"{r['best_mitigation']} ({fmt(r['best_delta_ppl'], 3)})" if r["best_mitigation"] else ""
        cells = (r["model"], r["corpus"], str(r["rank"]), r["scheme"], r["bits"], r["kernels"],
                 fmt(r["ppl_ratio"], 4), fmt(r["kl"], 3), best)
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return lines + [""]


def to_json(frame: Any, failures: list[dict[str, Any]], skipped: list[str], superseded: int,
            notes: Iterable[str] = ()) -> str:
    rows = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
            for r in frame.astype(object).where(frame.notna(), None).to_dict(orient="records")]
    data = {"columns": {c: COLUMNS[c][0] for c in COLUMNS}, "rows": rows,
            "failed": [{k: f.get(k) for k in ("run_id", "config", "error_type", "error", "created_at")}
                       for f in failures],
            "skipped_files": skipped, "superseded_records": superseded, "environments": list(notes),
            "matrix": matrix_rows(matrices(rows)), "ranking": ranking(rows)}
    return json.dumps(data, indent=1, default=str) + "\n"


README_START, README_END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"


def update_readme(path: str | Path, markdown: str) -> bool:
    """Replace the text between the leaderboard markers of a README (-> whether it changed)."""
    from quantsink.errors import QuantsinkError
    from quantsink.io import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise QuantsinkError(f"{path}: no '{README_START}' ... '{README_END}' markers to put the table between")
    new = text[:start + len(README_START)] + "\n" + markdown + text[end:]
    if new != text:
        atomic_write_text(path, new)
    return new != text


@dataclass
class Written:
    paths: list[Path] = field(default_factory=list)
    n_records: int = 0
    n_rows: int = 0
    n_failures: int = 0
    n_skipped: int = 0


def read_results(results: str | Path) -> tuple[list[RunRecord], list[str]]:
    """Every valid record; files skipped (invalid, newer schema) are returned and warned about."""
    from quantsink.records.store import iter_records

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = list(iter_records(results))
    records, unusable = usable(records, results)
    skipped = [str(w.message) for w in caught] + unusable
    for message in skipped:
        warnings.warn(message, stacklevel=2)
    return records, skipped


def usable(records: list[RunRecord], results: str | Path) -> tuple[list[RunRecord], list[str]]:
    """The records whose row can be built; each other one (statistics of the wrong shape) is named and
    skipped, so one bad record never costs the report the others."""
    kept, skipped = [], []
    for record in records:
        try:
            row(record)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as err:
            skipped.append(f"skipped {Path(results) / record.run_id}.json: its statistics cannot be read "
                           f"({type(err).__name__}: {str(err)[:80]}); re-run it")
        else:
            kept.append(record)
    return kept, skipped


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string that would start a formula gets a leading "'"."""
    if isinstance(value, tuple):
        value = fmt(value, 6)
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def to_csv(frame: Any) -> str:
    """The leaderboard as CSV; text cells are neutralised against formula injection."""
    return frame.astype(object).map(csv_cell).to_csv(index=False)


def to_matrix_csv(frame: Any) -> str:
    """The scheme x mitigation matrix (the html's and markdown's first view) in long form, one row per cell."""
    import pandas as pd

    rows = matrix_rows(matrices(frame.to_dict(orient="records") if len(frame) else []))
    return to_csv(pd.DataFrame(rows, columns=list(MATRIX_CSV)))


def record_links(results: str | Path, out: str | Path) -> dict[str, str]:
    """run_id -> the record file's path relative to the leaderboard (the html links each row to it)."""
    import os

    root = Path(results)
    return {path.stem: Path(os.path.relpath(path, Path(out))).as_posix() for path in sorted(root.glob("*.json"))}


def check_results(results: str | Path, records: list[Any], failures: list[Any], skipped: list[str]) -> None:
    """A missing or empty results directory is an error: the old leaderboard is kept, nothing is written."""
    from quantsink.errors import QuantsinkError, UsageError

    if not Path(results).is_dir():
        raise UsageError(f"--results {results}: no such directory; nothing written")
    if not records and not failures:
        why = f" ({len(skipped)} files skipped)" if skipped else ""
        raise QuantsinkError(f"--results {results}: no run records{why}; run `quantsink eval` or "
                             f"`quantsink sweep` first (nothing written)")


def write_report(results: str | Path, out: str | Path) -> Written:
    """results/ -> leaderboard.{md,csv,json,html} and leaderboard_matrix.csv in ``out``."""
    from quantsink.io import atomic_write_text
    from quantsink.records.store import check_writable_dir
    from quantsink.records.store import iter_failures

    check_writable_dir(out, "--out")
    records, skipped = read_results(results)
    failures = list(iter_failures(results))
    check_results(results, records, failures, skipped)
    frame, kept, superseded = leaderboard(records)
    notes = environment_notes(kept)
    out = Path(out)
    files = {
        "leaderboard.md": to_markdown(frame, failures, notes),
        "leaderboard.csv": to_csv(frame),
        "leaderboard_matrix.csv": to_matrix_csv(frame),
        "leaderboard.json": to_json(frame, failures, skipped, superseded, notes),
        "leaderboard.html": to_html(frame, plots(frame, kept), failures, skipped, superseded,
                                    record_links(results, out), notes),
    }
    written = Written(n_records=len(records), n_rows=len(frame), n_failures=len(failures), n_skipped=len(skipped))
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.paths.append(out / name)
    return written
