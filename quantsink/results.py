"""Run records: schema-versioned JSON, one file per run, written atomically.

A record is a plain dict; ``SCHEMA_VERSION`` changes when a field changes
meaning.  Readers skip (with a warning) files that are not valid records or
carry a newer schema, so one bad file never loses the others.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from .errors import QuantsinkError, UsageError
from .io import atomic_write_text

SCHEMA_VERSION = 1
REQUIRED = ("schema_version", "run_id", "model", "corpus", "protocol", "scheme", "reference", "candidate")


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null (and never silently as numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class NewerSchema(QuantsinkError):
    """A record written by a newer quantsink: valid, unreadable here, never replaced."""


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


def write_record(record: dict[str, Any], results_dir: str | Path) -> Path:
    """Write ``record`` to ``<results_dir>/<run_id>.json`` atomically; a record there written by
    a newer quantsink is kept (with a warning), never replaced by this older one."""
    path = record_path(results_dir, record["run_id"])
    if _newer(path):
        warnings.warn(f"{path} was written by a newer quantsink: kept, this run's record not written",
                      stacklevel=2)
        return path
    atomic_write_text(path, json.dumps(_finite(record), indent=1, sort_keys=False) + "\n")
    return path


def _newer(path: Path) -> bool:
    try:
        load_record(path)
    except NewerSchema:
        return True
    except QuantsinkError:
        pass
    return False


def validate(record: Any, source: str = "record") -> dict[str, Any]:
    if not isinstance(record, dict):
        raise QuantsinkError(f"{source}: not a JSON object; delete or fix the file")
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise QuantsinkError(f"{source}: not a quantsink record (missing {', '.join(missing)}); move it out of the results directory")
    version = record["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise QuantsinkError(f"{source}: schema_version {version!r} is not a positive integer; "
                             f"move the file out of the results directory")
    if version > SCHEMA_VERSION:
        raise NewerSchema(f"{source}: schema version {version} is newer than this quantsink "
                          f"({SCHEMA_VERSION}); upgrade quantsink to read it")
    wrong = [key for key in SECTIONS if not isinstance(record[key], dict)]
    if wrong or not isinstance(record["run_id"], str):
        raise QuantsinkError(f"{source}: not a quantsink record ({(wrong or ['run_id'])[0]} has the wrong type); "
                             f"move it out of the results directory")
    return record


SECTIONS = ("model", "corpus", "protocol", "scheme", "reference", "candidate")  # each a JSON object


def load_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantsinkError(f"{path}: no such results file") from None
    except IsADirectoryError:
        raise QuantsinkError(f"{path}: a directory, not a results file; rename it") from None
    except OSError as err:
        raise QuantsinkError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise QuantsinkError(f"{path}: corrupt results file ({err.__class__.__name__}); delete it and re-run") from None
    return validate(data, str(path))


def iter_records(results_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every valid record under ``results_dir``; invalid files are skipped with a warning."""
    root = Path(results_dir)
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.json")):
        try:
            yield load_record(path)
        except QuantsinkError as err:
            warnings.warn(f"skipped {err}", stacklevel=2)


def find_record(results_dir: str | Path, run_id: str) -> dict[str, Any] | None:
    path = record_path(results_dir, run_id)
    if not path.is_file():
        return None
    try:
        return load_record(path)
    except QuantsinkError as err:
        warnings.warn(f"ignored {err}", stacklevel=2)
        return None
