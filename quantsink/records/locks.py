"""Lock files that survive crashes: a run (or a reference group) is claimed by creating a file with
``O_CREAT | O_EXCL`` holding the owner's pid, host and process start time; a lock whose owner is
dead (or whose pid was reused by another process) is broken, so a killed worker never blocks a
later sweep.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from quantsink.records.store import read_json


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux /proc), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def owner_alive(owner: dict[str, Any]) -> bool:
    """Is the process that wrote a lock still running?  (Other hosts: assumed alive.)"""
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _start_time(pid)
    return owner.get("start") is None or start is None or start == owner["start"]


def try_lock(path: Path, grace_s: float = 10.0) -> bool:
    """Create ``path`` exclusively (O_CREAT|O_EXCL) with our pid; break it once if its owner is dead."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _break_if_stale(path, grace_s):
                return False
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(_owner(), handle)
        return True
    return False


def _break_if_stale(path: Path, grace_s: float) -> bool:
    """Remove a lock whose owner is dead.  A second lock (``.break``) serialises breakers,
    so a lock re-created by a live process between our check and unlink is never removed."""
    owner = read_json(path)
    if owner is None:
        return True  # released meanwhile
    if _stale(path, owner, grace_s) is False:
        return False
    breaker = path.with_name(path.name + ".break")
    try:
        os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        if time.time() - _mtime(breaker) > 60:  # a breaker killed mid-break
            breaker.unlink(missing_ok=True)
        return False
    try:
        owner = read_json(path)
        if owner is not None and _stale(path, owner, grace_s):
            path.unlink(missing_ok=True)
        return True
    finally:
        breaker.unlink(missing_ok=True)


def _stale(path: Path, owner: dict[str, Any], grace_s: float) -> bool:
    if not owner:  # unreadable: stale once older than the grace period
        return time.time() - _mtime(path) > grace_s
    return not owner_alive(owner)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def release(path: Path) -> None:
    owner = read_json(path)
    if owner is not None and owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
