"""A record is known by its contents (issue 31, cases 2 and 3): the run it holds, a digest of its own
content checked on read, every field the statistics use validated, one directory level read."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from quantsink.errors import QuantsinkError
from quantsink.records.store import (DIGEST, Store, content_sha256, find_record, iter_records, load_record,
                                     write_record)
from synthetic_records import make_record


def _rewrite(path: Path, change) -> None:
    """Edit a stored record and re-seal it (a well-formed file whose fields are wrong)."""
    data = json.loads(path.read_text())
    data.pop(DIGEST)
    change(data)
    path.write_text(json.dumps({**data, DIGEST: content_sha256(data)}))


def test_a_record_saved_under_another_runs_name_is_not_that_run(tmp_path):
    kv8 = make_record(scheme="kv8")
    kv8_int8 = make_record(scheme="int8")
    write_record(kv8, tmp_path)
    shutil.copy(tmp_path / f"{kv8.run_id}.json", tmp_path / f"{kv8_int8.run_id}.json")
    with pytest.warns(UserWarning, match=f"holds run {kv8.run_id}, not {kv8_int8.run_id}"):
        assert find_record(tmp_path, kv8_int8.run_id) is None
    store = Store(tmp_path)
    assert store.status(kv8_int8.run_id) == "invalid" and store.status(kv8.run_id) == "done"
    assert find_record(tmp_path, kv8.run_id).run_id == kv8.run_id


def test_an_edited_number_is_refused_in_one_line_and_the_rest_is_read(tmp_path):
    good, edited = make_record(scheme="int8"), make_record(scheme="nf4")
    write_record(good, tmp_path)
    path = write_record(edited, tmp_path)
    data = json.loads(path.read_text())
    data["candidate"]["ppl"] = 8.5
    path.write_text(json.dumps(data))
    with pytest.raises(QuantsinkError, match="edited after it was written") as err:
        load_record(path)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="edited after it was written"):
        assert [r.run_id for r in iter_records(tmp_path)] == [good.run_id]
    assert Store(tmp_path).status(edited.run_id) == "invalid"


def test_a_record_without_its_digest_is_not_trusted(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(make_record().to_dict()))
    with pytest.raises(QuantsinkError, match="has no content digest"):
        load_record(path)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(created_at="9999-zzz"), "created_at '9999-zzz' is not an ISO timestamp"),
    (lambda d: d["candidate"]["nll_per_window"].pop(), "per-window lists of unequal or zero length"),
    (lambda d: d["reference"]["scored_per_window"].append(3), "per-window lists of unequal or zero length"),
    (lambda d: d["candidate"]["nll_per_window"].__setitem__(0, None), "candidate.nll_per_window holds a null"),
    (lambda d: [d[s].update(nll_per_window=[], scored_per_window=[], kl_per_window=None)
                for s in ("reference", "candidate")], "zero length"),
    (lambda d: d.update(noise_floor={"nats_per_token": "0.01"}), "noise_floor.nats_per_token is not a number"),
])
def test_every_field_the_statistics_use_is_validated(tmp_path, change, message):
    path = write_record(make_record(), tmp_path)
    _rewrite(path, change)
    with pytest.raises(QuantsinkError, match=message) as err:
        load_record(path)
    assert "\n" not in str(err.value)


def test_one_directory_level_unless_asked(tmp_path):
    current = make_record(created_at="2026-11-28T16:00:00+00:00")
    write_record(current, tmp_path)
    stale = make_record(scheme="nf4")
    write_record(stale, tmp_path / "old-copy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.run_id for r in iter_records(tmp_path)] == [current.run_id]
    assert {r.run_id for r in iter_records(tmp_path, recursive=True)} == {current.run_id, stale.run_id}


def test_the_digest_is_of_the_record_as_read_back(tmp_path):
    import dataclasses

    record = make_record()
    odd = dataclasses.replace(record, timing={"load_s": 1.0}, calibration={10: {"a": 1}, 2: {"b": 2}})
    path = write_record(odd, tmp_path)
    assert load_record(path).calibration == {"10": {"a": 1}, "2": {"b": 2}}
