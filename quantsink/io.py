"""Files: the cache directory and the one atomic write every module uses.

A write goes to a temporary file in the target's directory, is flushed and
fsynced, then ``os.replace``d over the target; on any failure the temporary
file is removed and the old target (if any) is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """``$QUANTSINK_CACHE`` (default ``~/.cache/quantsink``): converted models, reference passes, digests."""
    return Path(os.environ.get("QUANTSINK_CACHE", Path.home() / ".cache" / "quantsink")).expanduser()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``; on a clean exit it is fsynced and replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; the file gets the mode open() would give
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask (read from /proc on Linux, else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_writable_file(path: Path, flag: str) -> None:
    """``path`` can be written as a file: not a folder, under a folder this process can write into (or
    create).  Checked before the work, so an output that cannot be written costs nothing."""
    from quantsink.errors import UsageError

    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    check_writable_folder(path.parent, f"{flag} {path}", "give a path you can write to")


def check_writable_folder(folder: Path, where: str, what: str) -> None:
    """``folder`` is, or can be created as, a folder this process can write into: its nearest existing
    ancestor is a folder and writable (one line otherwise, saying ``where`` and ``what`` to do)."""
    from quantsink.errors import QuantsinkError, UsageError

    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{where}: {probe} is a file, not a folder; {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QuantsinkError(f"{where}: {probe} is not writable; {what}")


def read_text_file(path: Path, flag: str) -> str:
    """The UTF-8 text of an input file, or a one-line ``UsageError`` saying why it cannot be read."""
    from quantsink.errors import UsageError

    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{flag} {path} does not exist (no such file)") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path} is a folder; give a file") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot be read ({err.strerror or type(err).__name__})") from None
