"""The results store: a directory of ``<run_id>.json`` records (:mod:`quantsink.records.schema`),
``<run_id>.failed`` failure files (JSON, not records), and ``.locks/``.  Records are written atomically;
readers skip (with a warning) files that are not valid records, so one bad file never loses the others.

A record is known by its contents, never by its file name: each file carries ``content_sha256``, the
sha256 of the record's canonical JSON (sorted keys), checked on every read, so an edited number is
refused, not reported as measured; every field the statistics use is validated (per-window lists of
one length, finite NLLs, numeric noise floor, an ISO ``created_at``); a lookup by run id takes a file
only when the record in it is that run's; the store is read one directory level deep unless asked.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import math
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from quantsink.errors import QuantsinkError, UsageError
from quantsink.io import atomic_write_text
from quantsink.records.schema import NewerSchema, RunRecord


def check_writable_dir(path: str | Path, flag: str) -> None:
    """``path`` is, or can be created as, a directory this process can write into (checked before the work)."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise UsageError(f"{flag} {path} {where}; give a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QuantsinkError(f"{flag} {path}: {probe} is not writable; give a directory you can write to")


def record_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / f"{run_id}.json"


def write_record(record: RunRecord, results_dir: str | Path) -> Path:
    """Write ``record`` to ``<results_dir>/<run_id>.json`` atomically; a record there written by
    a newer quantsink is kept (with a warning), never replaced by this older one."""
    path = record_path(results_dir, record.run_id)
    if _newer(path):
        warnings.warn(f"{path} was written by a newer quantsink: kept, this run's record not written",
                      stacklevel=2)
        return path
    data = json.loads(json.dumps(record.to_dict()))  # as a reader will see it (e.g. integer keys as strings)
    try:
        atomic_write_text(path, json.dumps({**data, DIGEST: content_sha256(data)}, indent=1) + "\n")
    except OSError as err:  # a full or read-only disk: one line, no partial file (atomic_path removes it)
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or type(err).__name__)
        raise QuantsinkError(f"cannot write record {path}: {why}; free space or give another --results, "
                             f"then re-run (runs already recorded are kept)") from None
    return path


DIGEST = "content_sha256"  # the file's key for the record's own digest (not a record field)


def content_sha256(data: dict[str, Any]) -> str:
    """sha256 of a record's JSON object, canonical: sorted keys, no whitespace."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _newer(path: Path) -> bool:
    try:
        load_record(path)
    except NewerSchema:
        return True
    except QuantsinkError:
        pass
    return False


def load_record(path: str | Path) -> RunRecord:
    """Read and validate one record file (one-line ``QuantsinkError`` when it is not a valid record)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such results file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: a directory, not a results file; rename it") from None
    except OSError as err:
        raise QuantsinkError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise QuantsinkError(f"{path}: corrupt results file ({err.__class__.__name__}); delete it and re-run") from None
    stored = data.pop(DIGEST, None) if isinstance(data, dict) else None
    record = RunRecord.from_dict(data, str(path))
    if stored != content_sha256(data):
        why = "was edited after it was written" if stored else "has no content digest"
        raise QuantsinkError(f"{path}: the record {why} ({DIGEST}); not trusted, re-run it")
    check_contents(record, str(path))
    return record


def check_contents(record: RunRecord, where: str) -> None:
    """Every field the statistics use is usable (one-line ``QuantsinkError`` naming the first that is not)."""
    for problem in (_timestamp_problem(record.created_at), _windows_problem(record), _floor_problem(record.noise_floor)):
        if problem:
            raise QuantsinkError(f"{where}: {problem}; not a valid record")


def _timestamp_problem(created_at: str) -> str | None:
    try:
        dt.datetime.fromisoformat(created_at)
        return None
    except ValueError:
        return f"created_at {created_at[:40]!r} is not an ISO timestamp"


def _windows_problem(record: RunRecord) -> str | None:
    ref, cand = record.reference, record.candidate
    lists = {"reference.nll_per_window": ref.nll_per_window, "reference.scored_per_window": ref.scored_per_window,
             "candidate.nll_per_window": cand.nll_per_window, "candidate.scored_per_window": cand.scored_per_window,
             "candidate.kl_per_window": cand.kl_per_window,
             "candidate.top1_per_window": getattr(cand, "top1_per_window", None)}
    lengths = {name: len(values) for name, values in lists.items() if values is not None}
    if len(set(lengths.values())) != 1 or not lengths["reference.nll_per_window"]:
        return "per-window lists of unequal or zero length (" + ", ".join(f"{k} {v}" for k, v in lengths.items()) + ")"
    for name in ("reference.nll_per_window", "candidate.nll_per_window"):
        if not all(isinstance(x, float) and math.isfinite(x) for x in lists[name]):
            return f"{name} holds a null or non-finite NLL"
    return None


def _floor_problem(floor: dict[str, Any] | None) -> str | None:
    bad = [k for k, v in (floor or {}).items() if k in FLOOR_NUMBERS and v is not None
           and (isinstance(v, bool) or not isinstance(v, (int, float)))]
    return f"noise_floor.{bad[0]} is not a number" if bad else None


FLOOR_NUMBERS = ("ppl", "nats_per_token", "kl_margin")  # the noise floor's numbers the statistics read


def iter_records(results_dir: str | Path, *, recursive: bool = False) -> Iterator[RunRecord]:
    """Every valid record in ``results_dir`` (and its sub-folders when ``recursive``); invalid files are
    skipped with a one-line warning.  A record counts by its contents, whatever its file's name."""
    root = Path(results_dir)
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.json") if recursive else root.glob("*.json")):
        try:
            yield load_record(path)
        except QuantsinkError as err:
            warnings.warn(f"skipped {err}", stacklevel=2)


def load_stored(path: Path) -> RunRecord:
    """``<run_id>.json`` of the store: a valid record *of that run* (a record saved under another run's
    name is no record of this one)."""
    record = load_record(path)
    if record.run_id != path.stem:
        raise QuantsinkError(f"{path}: holds run {record.run_id}, not {path.stem} (a record is known by its "
                             f"contents); move it to {record.run_id}.json")
    return record


def find_record(results_dir: str | Path, run_id: str) -> RunRecord | None:
    path = record_path(results_dir, run_id)
    if not path.is_file():
        return None
    try:
        return load_stored(path)
    except QuantsinkError as err:
        warnings.warn(f"ignored {err}", stacklevel=2)
        return None


# --------------------------------------------------------------------------- the store


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object (lock, failure file); None when absent, {} when unreadable."""
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a process killed between create and write


@dataclass(frozen=True)
class Store:
    """The results directory: records, failure files, locks."""

    root: Path

    @property
    def locks(self) -> Path:
        return self.root / ".locks"

    def record(self, run_id: str) -> Path:
        return self.root / f"{run_id}.json"

    def failure(self, run_id: str) -> Path:
        return self.root / f"{run_id}.failed"

    def has_record(self, run_id: str) -> bool:
        return self.record(run_id).is_file()

    def status(self, run_id: str) -> str:
        """``absent``, ``done`` (a valid record), ``newer`` (a record of a newer quantsink: kept,
        never re-run) or ``invalid`` (a file that is no record: set aside, re-run)."""
        path = self.record(run_id)
        if not path.exists():
            return "absent"
        try:
            load_stored(path)
            return "done"
        except NewerSchema:
            return "newer"
        except QuantsinkError:
            return "invalid"

    def problem(self, run_id: str) -> str | None:
        """Why ``<run_id>.json`` is not a valid record (None when it is)."""
        try:
            load_stored(self.record(run_id))
            return None
        except QuantsinkError as err:
            return str(err)

    def has_valid_record(self, run_id: str) -> bool:
        return self.status(run_id) in ("done", "newer")

    def set_aside(self, run_id: str) -> Path:
        """Rename an invalid ``<run_id>.json`` to the first free ``.json.invalid[.N]`` (never overwrites)."""
        for n in range(10_000):
            target = self.root / (f"{run_id}.json.invalid" + (f".{n}" if n else ""))
            try:
                os.link(self.record(run_id), target)  # fails if target exists: no overwrite race
            except FileExistsError:
                continue
            self.record(run_id).unlink()
            return target
        raise QuantsinkError(f"{self.root}: too many {run_id}.json.invalid files; clean them up")

    def failed_in(self, run_id: str, sweep: str) -> bool:
        data = read_json(self.failure(run_id))
        return bool(data) and data.get("sweep") == sweep

    def write(self, record: RunRecord) -> Path:
        """The record, atomically; any failure file of the run is removed after."""
        path = write_record(record, self.root)
        self.failure(record.run_id).unlink(missing_ok=True)
        return path

    def warm(self, group: str) -> bool:
        return (self.locks / f"group-{group}.warm").exists()

    def mark_warm(self, group: str) -> None:
        (self.locks / f"group-{group}.warm").touch()

    def write_failure(self, run: Any, error: BaseException, sweep: str, seconds: float) -> None:
        failure = {
            "kind": "quantsink-failure", "run_id": run.run_id, "sweep": sweep,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 2),
            "config": run.config.to_record(), "error_type": type(error).__name__,
            "error": str(error).splitlines()[0] if str(error) else type(error).__name__,
            "traceback": "".join(traceback.format_exception(error))[-4000:],
        }
        atomic_write_text(self.failure(run.run_id), json.dumps(failure, indent=1) + "\n")


def iter_failures(results_dir: str | Path) -> Iterable[dict[str, Any]]:
    """Failure files of runs that have no record (a later success supersedes them)."""
    root = Path(results_dir)
    for path in sorted(root.glob("*.failed")) if root.is_dir() else []:
        data = read_json(path)
        if data and data.get("kind") == "quantsink-failure" and not (root / f"{path.stem}.json").exists():
            yield data
