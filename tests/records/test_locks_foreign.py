"""Locks from another host (issue 31, case 5): who holds it and since when; a lock whose owner is
provably gone (not refreshed for FOREIGN_STALE_S) is taken over; a full disk leaves no 0-byte lock."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from quantsink.errors import QuantsinkError
from quantsink.records import locks


def _foreign(path, age_s: float) -> None:
    path.write_text(json.dumps({"pid": 4242, "host": "restarted-container-1f3a", "start": "123",
                                "since": "2026-12-01T10:00:00+00:00"}))
    old = time.time() - age_s
    os.utime(path, (old, old))


def test_a_refreshed_foreign_lock_is_respected_and_a_silent_one_taken_over(tmp_path):
    lock = tmp_path / "run.lock"
    _foreign(lock, age_s=5)
    assert not locks.try_lock(lock)  # its owner refreshed it 5 s ago: alive
    _foreign(lock, age_s=locks.FOREIGN_STALE_S + 60)
    assert locks.try_lock(lock)  # no heartbeat for longer than FOREIGN_STALE_S: the owner is gone
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    locks.release(lock)
    assert not lock.exists()


def test_a_waiter_says_who_holds_the_lock_and_since_when(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "TELL_AFTER_S", 0.0)
    lock = tmp_path / "group-x.lock"
    _foreign(lock, age_s=1)
    assert locks.holder(lock) == "pid 4242 on host restarted-container-1f3a since 2026-12-01T10:00:00+00:00"
    with pytest.warns(UserWarning, match="held by pid 4242 on host restarted-container-1f3a since 2026-12-01"):
        assert not locks.try_lock(lock)


def test_a_holder_refreshes_its_locks(tmp_path):
    lock = tmp_path / "mine.lock"
    assert locks.try_lock(lock)
    old = time.time() - 3600
    os.utime(lock, (old, old))
    locks.refresh_held()
    assert time.time() - lock.stat().st_mtime < 60 and "since" in json.loads(lock.read_text())
    locks.release(lock)


def test_a_full_disk_leaves_no_empty_lock(tmp_path, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.json, "dump", full)
    lock = tmp_path / "run.lock"
    with pytest.raises(QuantsinkError, match="the disk is full") as err:
        locks.try_lock(lock)
    assert "\n" not in str(err.value) and not lock.exists()
