"""One bad record must not cost the rest (issue 31, case 10): report and compare name it, skip it,
write the rest; a run id whose file is corrupt or newer says so (not "unknown scheme")."""

from __future__ import annotations

import json

import pytest

from quantsink.analysis.compare import resolve
from quantsink.errors import QuantsinkError
from quantsink.records.schema import SCHEMA_VERSION
from quantsink.records.store import DIGEST, content_sha256, write_record
from quantsink.report.leaderboard import write_report
from synthetic_records import make_record, write_grid


def _reseal(path, change) -> None:
    data = json.loads(path.read_text())
    data.pop(DIGEST)
    change(data)
    path.write_text(json.dumps({**data, DIGEST: content_sha256(data)}))


BAD = {
    "layers": lambda d: d["stats"]["reference"].update(layers=[{"residual_peak_ratio": 2.0}, 5]),
    "changes": lambda d: d["stats"].update(changes={"layers": []}),
    "windows": lambda d: d["candidate"]["nll_per_window"].pop(),
    "null-nll": lambda d: d["reference"]["nll_per_window"].__setitem__(0, None),
    "floor": lambda d: d.update(noise_floor={"nats_per_token": "small"}),
}


def test_report_names_and_skips_each_bad_record_and_writes_the_rest(tmp_path):
    runs = tmp_path / "runs"
    good = len(write_grid(runs))
    bad = {}
    for i, (name, change) in enumerate(BAD.items()):
        record = make_record(scheme="fp4", seed=i, settings={"seed": i + 1})
        _reseal(write_record(record, runs), change)
        bad[name] = record.run_id
    with pytest.warns(UserWarning) as caught:
        written = write_report(runs, tmp_path / "out")
    messages = " | ".join(str(w.message) for w in caught)
    assert written.n_skipped == len(BAD) and written.n_rows >= good - 1
    assert all(run_id in messages for run_id in bad.values()), messages
    assert (tmp_path / "out" / "leaderboard.md").is_file() and (tmp_path / "out" / "leaderboard.html").is_file()


def test_compare_says_what_is_wrong_with_a_run_ids_file(tmp_path):
    runs = tmp_path / "runs"
    record = make_record(scheme="fp4")
    path = write_record(record, runs)
    _reseal(path, BAD["windows"])
    with pytest.raises(QuantsinkError, match="per-window lists of unequal") as err:
        resolve(record.run_id, runs)
    assert "unknown scheme" not in str(err.value)
    path.write_text(json.dumps({**record.to_dict(), "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(QuantsinkError, match="newer than this quantsink"):
        resolve(record.run_id, runs)


def test_plots_draw_a_bounded_number_of_groups():
    import pandas as pd

    from quantsink.report.figures import PLOT_GROUPS, first_groups

    frame = pd.DataFrame({"model": [f"m{i // 2}" for i in range(60)], "corpus": ["c"] * 60, "x": range(60)})
    kept, note = first_groups(frame)
    assert len(set(kept["model"])) == PLOT_GROUPS and f"first {PLOT_GROUPS} of 30" in note
    small, none = first_groups(frame.head(4))
    assert len(small) == 4 and none == ""
