import json
import os

import pytest

from quantsink.errors import QuantsinkError
from quantsink.results import SCHEMA_VERSION, iter_records, load_record, write_record


def record(run_id="abc", **extra):
    base = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "model": {}, "corpus": {}, "protocol": {},
            "scheme": {}, "reference": {"ppl": 1.0}, "candidate": {"ppl": float("nan")}}
    return {**base, **extra}


def test_round_trip_and_nan_written_as_null(tmp_path):
    path = write_record(record(), tmp_path)
    assert path.name == "abc.json"
    back = load_record(path)
    assert back["candidate"]["ppl"] is None and back["reference"]["ppl"] == 1.0


def test_atomic_write_leaves_old_file_when_serialisation_fails(tmp_path):
    write_record(record(), tmp_path)
    with pytest.raises(TypeError):
        write_record(record(candidate={"bad": object()}), tmp_path)
    assert load_record(tmp_path / "abc.json")["reference"]["ppl"] == 1.0
    assert os.listdir(tmp_path) == ["abc.json"]  # no temporary file left behind


def test_corrupt_and_newer_files_are_skipped_with_warnings(tmp_path):
    write_record(record("good"), tmp_path)
    (tmp_path / "corrupt.json").write_text("{not json")
    (tmp_path / "newer.json").write_text(json.dumps(record("newer", schema_version=SCHEMA_VERSION + 1)))
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.warns(UserWarning) as caught:
        runs = [r["run_id"] for r in iter_records(tmp_path)]
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
