import dataclasses
import json
import os

import pytest

from quantsink.errors import QuantsinkError
from quantsink.records.schema import SCHEMA_VERSION, RunRecord
from quantsink.records.store import iter_records, load_record, write_record
from synthetic_records import make_record


def record(run_id="abc", **changes):
    return dataclasses.replace(make_record(), run_id=run_id, **changes)


def test_round_trip_through_the_schema_and_nan_written_as_null(tmp_path):
    rec = record()
    path = write_record(rec, tmp_path)
    assert path.name == "abc.json" and load_record(path) == rec
    nan = record(candidate=dataclasses.replace(rec.candidate, kl=float("nan")))
    back = load_record(write_record(nan, tmp_path))
    assert back.candidate.kl is None and back.reference.ppl == rec.reference.ppl
    assert "NaN" not in path.read_text()


def test_atomic_write_leaves_old_file_when_serialisation_fails(tmp_path):
    write_record(record(), tmp_path)
    with pytest.raises(TypeError):
        write_record(record(env={"bad": object()}), tmp_path)
    assert load_record(tmp_path / "abc.json") == record()
    assert os.listdir(tmp_path) == ["abc.json"]  # no temporary file left behind


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("candidate"), "missing field 'candidate'"),
    (lambda d: d.update(mitigation_effect={}), "unknown field 'mitigation_effect'"),
    (lambda d: d["candidate"].update(ppl="12"), "candidate.ppl: expected float"),
    (lambda d: d["candidate"].update(scored_per_window=[1, 2.5]), r"scored_per_window\[1\]: expected int"),
    (lambda d: d["config"].update(bos="sometimes"), "config"),
    (lambda d: d["stats"].update(reference={"layers": []}), "stats: a stats side needs"),
    (lambda d: d.update(schema_version=1), "older than this quantsink"),
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "newer than this quantsink"),
    (lambda d: d.update(schema_version="2"), "not a quantsink record"),
])
def test_reading_validates_against_the_schema(change, message):
    data = record().to_dict()
    change(data)
    with pytest.raises(QuantsinkError, match=message) as err:
        RunRecord.from_dict(data, "x.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("x.json")


def test_corrupt_and_newer_files_are_skipped_with_warnings(tmp_path):
    write_record(record("good"), tmp_path)
    (tmp_path / "corrupt.json").write_text("{not json")
    (tmp_path / "newer.json").write_text(json.dumps({**record("newer").to_dict(), "schema_version": SCHEMA_VERSION + 1}))
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.warns(UserWarning) as caught:
        runs = [r.run_id for r in iter_records(tmp_path)]
    assert runs == ["good"]
    messages = " ".join(str(w.message) for w in caught)
    assert "corrupt" in messages and "newer" in messages and "not a quantsink record" in messages


def test_load_record_errors_are_one_line(tmp_path):
    (tmp_path / "x.json").write_text("[1")
    with pytest.raises(QuantsinkError, match="corrupt results file") as err:
        load_record(tmp_path / "x.json")
    assert "\n" not in str(err.value)
    with pytest.raises(QuantsinkError, match="no such results file"):
        load_record(tmp_path / "missing.json")
