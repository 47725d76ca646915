"""The leaderboard's first view: scheme x mitigation matrix, best mitigation, scheme ranking (md, csv, json, html)."""

from __future__ import annotations

import csv
import io
import json

from quantsink.report.matrix import Cell, cell_text, matrices, ranking
from quantsink.report.leaderboard import leaderboard, write_report
from synthetic_records import grid_records, make_record, write_grid


def _rows(records):
    frame, _, _ = leaderboard(records)
    return frame.to_dict(orient="records")


def test_matrix_cells_verdicts_and_best():
    ms = matrices(_rows(grid_records()))
    assert len(ms) == 4  # 2 models x 2 corpora
    m = next(m for m in ms if (m.model, m.corpus) == ("tiny-llama", "python-docs"))
    assert m.schemes == ["w8a8"] and m.mitigations == ["sink-fp", "smooth"]  # most helps first
    assert m.cells[("w8a8", "sink-fp")].verdict == "helps" and m.best("w8a8") == "sink-fp"
    assert m.cells[("w8a8", "smooth")].verdict == "inconclusive" and not m.cells[("w8a8", "smooth")].best


def test_no_best_when_nothing_helps():
    records = [make_record(scheme="w8a8", ppl=25.0), make_record(scheme="w8a8", mitigation="smooth", ppl=25.0,
                                                                 noise=30.0, seed=1)]
    (m,) = matrices(_rows(records))
    assert m.best("w8a8") is None and "★" not in cell_text(m.cells[("w8a8", "smooth")])
    assert cell_text(Cell("not-applicable", 0.0, (0.0, 0.0), "x")) == "n/a"


def test_ranking_orders_schemes_by_ppl_ratio_with_bits_and_kernels():
    rank = [r for r in ranking(_rows(grid_records())) if (r["model"], r["corpus"]) == ("tiny-gemma", "python-code")]
    assert [(r["rank"], r["scheme"], r["kernels"]) for r in rank] == [(1, "int8", "real"), (2, "nf4", "real"),
                                                                       (1, "w8a8", "simulated")]  # ranked apart
    assert rank[1]["bits"] == "W4A32KV32" and rank[2]["best_mitigation"] == "sink-fp"


def test_markdown_csv_and_json_carry_the_same_matrix(tmp_path):
    write_grid(tmp_path / "runs")
    write_report(tmp_path / "runs", tmp_path / "out")
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "leaderboard_matrix.csv").read_text())))
    data = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert len(rows) == len(data["matrix"]) == 8
    assert md.index("Which mitigation helps") < md.index("Schemes ranked") < md.index("All runs")
    for row in rows:
        assert row["verdict"] in {"helps", "inconclusive"}
        assert (row["best"] == "True") == (row["verdict"] == "helps")
    # -12 ppl is 80% of tiny-llama's damage (25 - 10) but 40% of tiny-gemma's (50 - 20): comparable across models
    assert md.count("| w8a8 | 2.5 | -12 (80%) helps ★ | ±0 (0%) inconclusive |") == 2
    assert md.count("| w8a8 | 2.5 | -12 (40%) helps ★ | ±0 (0%) inconclusive |") == 2
    assert {row["recovered"] for row in rows} == {"0.8", "0.4", "0.0"}
    html = (tmp_path / "out" / "leaderboard.html").read_text()
    assert html.index('class="matrix"') < html.index('id="ranking"') < html.index('id="leaderboard"')
