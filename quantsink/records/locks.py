"""Lock files that survive crashes: a run (or a reference group) is claimed by creating a file with
``O_CREAT | O_EXCL`` holding the owner's pid, host and process start time; a lock whose owner is
dead (or whose pid was reused by another process) is broken, so a killed worker never blocks a
later sweep.

A lock from another host (another container on a shared disk) cannot be checked by pid: its owner
refreshes the lock's mtime every ``HEARTBEAT_S`` while it holds it, and a foreign lock whose mtime is
older than ``FOREIGN_STALE_S`` has provably lost its owner (the host or container is gone) and is taken
over.  A process that waits on a lock says once who holds it and since when.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from quantsink.errors import QuantsinkError
from quantsink.records.store import read_json

HEARTBEAT_S = 30.0  # a holder refreshes its locks' mtime this often
FOREIGN_STALE_S = 300.0  # a lock from another host not refreshed for this long has lost its owner
_HELD: set[Path] = set()
_TOLD: set[Path] = set()  # locks this process said it waits on
_WAITING: dict[Path, float] = {}  # lock -> when this process first found it held
TELL_AFTER_S = 5.0
_GUARD = threading.Lock()


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux /proc), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def owner_alive(owner: dict[str, Any], path: Path | None = None) -> bool:
    """Is the process that wrote a lock still running?  Another host's: while it refreshes ``path``."""
    if owner.get("host") != socket.gethostname():
        return path is None or time.time() - _mtime(path) <= FOREIGN_STALE_S
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
                _tell_holder(path)
                return False
            continue
        _fill(fd, path)
        _hold(path)
        with _GUARD:
            _WAITING.pop(path, None)
        return True
    return False


def _fill(fd: int, path: Path) -> None:
    """Write our owner record into the new lock; on failure (a full disk) remove it: no 0-byte lock stays."""
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(_owner(), handle)
    except OSError as err:
        path.unlink(missing_ok=True)
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or type(err).__name__)
        raise QuantsinkError(f"cannot write lock {path}: {why}; free space and re-run") from None


def holder(path: Path) -> str:
    """Who holds a lock and since when, in words."""
    owner = read_json(path) or {}
    since = owner.get("since") or time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(_mtime(path)))
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {since}"


def _tell_holder(path: Path) -> None:
    """Once a wait on ``path`` has lasted ``TELL_AFTER_S``, say (once) who holds it."""
    with _GUARD:
        first = _WAITING.setdefault(path, time.monotonic())
        if path in _TOLD or time.monotonic() - first < TELL_AFTER_S:
            return
        _TOLD.add(path)
    warnings.warn(f"waiting for {path.name}: held by {holder(path)} (a lock from another host is taken over "
                  f"once not refreshed for {FOREIGN_STALE_S:.0f} s)", stacklevel=3)


def _hold(path: Path) -> None:
    """Keep ``path`` refreshed (its mtime is our heartbeat) until ``release``."""
    with _GUARD:
        _HELD.add(path)
        if not any(t.name == "quantsink-lock-heartbeat" for t in threading.enumerate()):
            threading.Thread(target=_heartbeat, name="quantsink-lock-heartbeat", daemon=True).start()


def _heartbeat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        refresh_held()


def refresh_held() -> None:
    """Touch every lock this process holds (their owners' heartbeat)."""
    with _GUARD:
        held = list(_HELD)
    for path in held:
        try:
            os.utime(path)
        except OSError:
            pass


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
    return not owner_alive(owner, path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def release(path: Path) -> None:
    with _GUARD:
        _HELD.discard(path)
        _TOLD.discard(path)
        _WAITING.pop(path, None)
    owner = read_json(path)
    if owner is not None and owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
