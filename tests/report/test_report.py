"""Report on synthetic records: derived columns, escaping, skipped files, failures, formats."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pandas as pd
import pytest

from quantsink.analysis.effects import effects
from quantsink.report.leaderboard import leaderboard, write_report
from quantsink.report.rows import row, woken_heads
from quantsink.records.schema import SCHEMA_VERSION
from quantsink.records.store import write_record
from synthetic_records import make_record, write_grid

EVIL = "<script>alert('x')</script>"


def test_row_derives_deltas_from_the_record():
    record = make_record(ppl_ref=10.0, ppl=12.5, woken=((2, 1), (4, 3)))
    r = row(record)
    assert r["ppl_ratio"] == pytest.approx(1.25)
    assert r["delta_bpb"] == pytest.approx(record.candidate.bits_per_byte - record.reference.bits_per_byte)
    sink_ref = record.stats.reference["heads"]["sink_score"]
    assert r["sink_before"] == pytest.approx(sum(map(sum, sink_ref)) / (len(sink_ref) * len(sink_ref[0])))
    assert r["peak_before"] == pytest.approx(300.0) and r["peak_after"] == pytest.approx(200.0)
    assert r["heads_woken"] == 2
    assert r["verdict"] is None and r["effect"] is None and r["d_sink"] is None


def test_woken_heads_are_the_records_changes():
    record = make_record(woken=((1, 1), (3, 2)))
    assert woken_heads(record) == [(1, 1), (3, 2)] and record.stats.changes["woken"] == ["L1H1", "L3H2"]
    assert woken_heads(make_record(stats=False)) is None
    hidden = dataclasses.replace(record, stats=dataclasses.replace(record.stats, candidate=None, changes=None))
    assert woken_heads(hidden) is None  # candidate stats not collected: unknown, not 0


def test_effect_and_d_sink_come_from_the_variant_records():
    records = [make_record(mitigation=m, ppl=p, seed=i) for i, (m, p) in enumerate((("none", 30.0), ("sink-fp", 18.0)))]
    frame, kept, _ = leaderboard(records)
    r = frame.set_index("mitigation").loc["sink-fp"]
    expected = effects(records[1], {rec.run_id: rec for rec in records}.get)
    assert (r["verdict"], r["effect"]) == ("helps", pytest.approx(-12.0)) and r["effect"] == expected.mitigation_effect["delta_ppl"]
    assert math.isnan(r["d_sink"])  # the scheme's d_sink is on its unmitigated row, not repeated here
    none = frame.set_index("mitigation").loc["none"]
    assert none["d_sink"] == pytest.approx(expected.d_sink["nats_per_token"]) and none["d_sink"] > 0
    alone, _, _ = leaderboard(records[1:])  # without the unmitigated run there is nothing to pair with
    assert alone["verdict"].isna().all() and alone["d_sink"].isna().all()


def test_not_applicable_shows_no_effect_and_bits_name_every_part():
    from quantsink.analysis.effects import Effects

    effect = {"delta_ppl": 0.0, "delta_kl": 0.0, "ci95": [0.0, 0.0], "verdict": "not-applicable"}
    r = row(make_record(mitigation="sink-token"), Effects(mitigation_effect=effect))
    assert (r["verdict"], r["effect"], r["effect_ci"]) == ("not-applicable", None, None)
    kv_only = make_record(scheme="kv4")
    assert row(kv_only)["bits"] == "W32A32KV4" and row(kv_only)["w_bits"] == 32.0
    in_bf16 = dataclasses.replace(kv_only, protocol=dataclasses.replace(kv_only.protocol, dtype="bfloat16"))
    assert row(in_bf16)["bits"] == "W16A16KV4"


def test_schemes_record_their_bit_widths():
    from quantsink.report.rows import bits_label

    labels = {spec: bits_label(make_record(scheme=spec))
              for spec in ("w8a8", "kv4", "w8a8-kv8", "int8", "nf4", "bf16")}
    assert labels == {"w8a8": "W8A8KV32", "kv4": "W32A32KV4", "w8a8-kv8": "W8A8KV8", "int8": "W8A8KV32",
                      "nf4": "W4A32KV32", "bf16": "W16A16KV16"}


def test_records_without_stats_leave_cells_empty():
    r = row(make_record(stats=False))
    assert all(r[k] is None for k in ("sink_before", "sink_after", "heads_woken", "peak_before", "drain_after"))


def test_newest_record_of_a_row_wins():
    old = make_record(ppl=20.0, created_at="2026-01-01T00:00:00+00:00")
    new = make_record(ppl=15.0, created_at="2026-06-01T00:00:00+00:00")
    frame, kept, superseded = leaderboard([new, old])
    assert len(frame) == 1 and frame["ppl"].iloc[0] == 15.0 and superseded == 1 and kept[0] is new


def test_write_report_all_formats(tmp_path):
    records = write_grid(tmp_path / "runs")
    written = write_report(tmp_path / "runs", tmp_path / "out")
    assert written.n_rows == len(records) == 20 and written.n_skipped == 0
    assert sorted(p.name for p in written.paths) == ["leaderboard.csv", "leaderboard.html", "leaderboard.json",
                                                     "leaderboard.md", "leaderboard_matrix.csv"]
    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert len(csv) == 20 and {"ppl_ratio", "verdict", "d_sink", "heads_woken", "protocol", "backend"} <= set(csv.columns)
    assert sorted(csv["verdict"].dropna().unique()) == ["helps", "inconclusive"]
    data = json.loads((tmp_path / "out" / "leaderboard.json").read_text())  # strict JSON: no NaN
    assert len(data["rows"]) == 20
    helps = [r for r in data["rows"] if r["verdict"] == "helps"]
    assert len(helps) == 4 and all(r["effect"] == pytest.approx(-12.0) and r["effect_ci"][1] < 0 for r in helps)
    assert sum(r["d_sink"] is not None for r in data["rows"]) == 4  # the unmitigated w8a8 rows only
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert md.split("**All runs**")[1].count("\n| ") == 21 and "Protocol: 8x128 tok" in md  # header + 20 rows
    page = (tmp_path / "out" / "leaderboard.html").read_text()
    assert page.count("<img ") == 5 and page.count("data:image/png;base64,") == 5
    assert "http://" not in page and "https://" not in page


def test_everything_shown_is_escaped(tmp_path):
    write_record(make_record(model=EVIL, corpus="a|b", scheme="int8", mitigation=f"{EVIL}"), tmp_path / "runs")
    (tmp_path / "runs" / "x.failed").write_text(json.dumps(
        {"kind": "quantsink-failure", "run_id": "x", "config": {"model": EVIL, "scheme": "s"}, "error": EVIL,
         "error_type": "QuantsinkError"}))
    write_report(tmp_path / "runs", tmp_path / "out")
    page = (tmp_path / "out" / "leaderboard.html").read_text()
    assert EVIL not in page and page.count("<script") == 1  # only the page's own sorter
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "<script" not in md and "a&#124;b" in md
    assert "Failed runs (1)" in md and "Failed runs (1)" in page


def test_corrupt_and_newer_schema_files_are_skipped_with_a_warning(tmp_path):
    runs = tmp_path / "runs"
    write_record(make_record(), runs)
    (runs / "corrupt.json").write_text("{not json")
    newer = make_record(scheme="nf4")
    (runs / f"{newer.run_id}.json").write_text(json.dumps({**newer.to_dict(), "schema_version": SCHEMA_VERSION + 1}))
    with pytest.warns(UserWarning) as caught:
        written = write_report(runs, tmp_path / "out")
    messages = " ".join(str(w.message) for w in caught)
    assert "corrupt" in messages and "newer" in messages
    assert written.n_rows == 1 and written.n_skipped == 2
    assert "skipped: " in (tmp_path / "out" / "leaderboard.html").read_text()


def test_failure_superseded_by_a_later_record_is_not_listed(tmp_path):
    runs = tmp_path / "runs"
    record = make_record()
    write_record(record, runs)
    (runs / f"{record.run_id}.failed").write_text(json.dumps({"kind": "quantsink-failure", "error": "old"}))
    assert write_report(runs, tmp_path / "out").n_failures == 0


def test_results_with_only_failures_give_an_empty_leaderboard(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "abc.failed").write_text(json.dumps({"kind": "quantsink-failure", "error": "boom", "config": {}}))
    written = write_report(runs, tmp_path / "out")
    assert written.n_rows == 0 and written.n_failures == 1
    assert "No records." in (tmp_path / "out" / "leaderboard.md").read_text()
    assert "No data for this plot" in (tmp_path / "out" / "leaderboard.html").read_text()


def test_plots_decode_as_png(tmp_path):
    import base64
    import re

    from PIL import Image

    write_grid(tmp_path / "runs")
    write_report(tmp_path / "runs", tmp_path / "out")
    page = (tmp_path / "out" / "leaderboard.html").read_text()
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and min(image.size) > 100


def test_missing_metrics_do_not_break_the_report():
    record = make_record()
    record = dataclasses.replace(record, candidate=dataclasses.replace(record.candidate, kl=None, ppl=None))
    r = row(record)
    assert r["ppl_ratio"] is None and r["kl"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in r.values())
