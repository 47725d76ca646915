"""Issue 12, data-loss cases: caches verified, identity complete, nothing overwritten by nothing, CSV safe."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantsink.measure import cache
from quantsink.data import models
from quantsink.cli import app
from quantsink.config import RunConfig
from quantsink.measure.passes import PassResult, Targets
from quantsink.report.leaderboard import write_report
from quantsink.records.store import write_record
from quantsink.pipeline.run import run
from synthetic_records import make_record

runner = CliRunner()


def overwrite_tensor(path: Path, name: str, data: bytes) -> None:
    """Overwrite the first bytes of tensor ``name`` inside a safetensors file (header left intact)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    start, _ = json.loads(raw[8:8 + size])[name]["data_offsets"]
    at = 8 + size + start
    path.write_bytes(raw[:at] + data + raw[at + len(data):])


# --------------------------------------------------------------------------- 1. reference cache digest


def tiny_pass() -> PassResult:
    g = torch.Generator().manual_seed(0)
    return PassResult(torch.rand(4, generator=g, dtype=torch.float64) * 100, torch.full((4,), 31),
                      torch.full((4,), 90), targets=Targets(torch.randn(124, 8, generator=g)), seconds=1.5,
                      extra={"stats": {"x": 1}})


@pytest.mark.parametrize("tensor,garbage", [("hidden", b"\x7f" * 16), ("nbytes", struct.pack("<q", -7)),
                                            ("nll", b"\x00" * 8)])
def test_reference_cache_garbage_is_detected_and_recomputed(tmp_path, tensor, garbage):
    path = tmp_path / "ref.safetensors"
    cache.save_pass(path, tiny_pass())
    assert cache.load_pass(path, 4) is not None
    overwrite_tensor(path, tensor, garbage)
    with pytest.warns(UserWarning, match="ref.safetensors is corrupt \\(digest mismatch\\); recomputing"):
        assert cache.load_pass(path, 4) is None


def test_reference_cache_keeps_the_kl_summary(tmp_path):
    g = torch.Generator().manual_seed(1)
    p = tiny_pass()
    p.targets = Targets(p.targets.hidden, neg_entropy=-torch.rand(124, generator=g, dtype=torch.float64),
                        expected_embedding=torch.randn(124, 8, generator=g), argmax=torch.arange(124))
    cache.save_pass(tmp_path / "ref.safetensors", p)
    back = cache.load_pass(tmp_path / "ref.safetensors", 4).targets
    assert back.summarised and all(torch.equal(getattr(back, k), getattr(p.targets, k)) for k in vars(p.targets))


def test_reference_cache_entry_without_digest_is_recomputed(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    p = tiny_pass()
    save_file({"nll": p.nll, "n_scored": p.n_scored, "nbytes": p.nbytes, "hidden": p.targets.hidden},
              str(path), metadata={"seconds": "1", "extra": "{}"})
    with pytest.warns(UserWarning, match="no digest"):
        assert cache.load_pass(path, 4) is None


def tiny_config(model_dir: Path, corpus: Path, results: Path, **kw) -> RunConfig:
    return RunConfig(model=str(model_dir), corpus=f"file:{corpus}", scheme="int8", window=32, max_tokens=128,
                     stats=False, device="cpu", results=str(results), **kw)


def test_tampered_reference_cache_gives_the_same_numbers_as_a_fresh_run(tiny_model_dir, tiny_text_file, tmp_path):
    config = tiny_config(tiny_model_dir, tiny_text_file, tmp_path / "runs")
    first = run(config, write=False)
    [entry] = Path(os.environ["QUANTSINK_REFERENCE_CACHE"]).glob("*.safetensors")
    overwrite_tensor(entry, "hidden", os.urandom(64))
    with pytest.warns(UserWarning, match="digest mismatch"):
        second = run(config, write=False)
    assert second.reference.cached is False
    assert second.candidate.kl == first.candidate.kl
    assert run(config, write=False).reference.cached is True  # rewritten, verified


# --------------------------------------------------------------------------- 2. converted-model cache


@pytest.fixture
def embedded(tiny_model_dir, tmp_path, monkeypatch):
    """An embedded model whose 'conversion' copies the tiny model; -> (convert, number of conversions)."""
    monkeypatch.setenv("QUANTSINK_CACHE", str(tmp_path / "qcache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(path, target):
        calls.append(target)
        models.install_converted(lambda tmp: [shutil.copy(p, tmp) for p in tiny_model_dir.iterdir()], target)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    source = models.GGUFSource(lambda: gguf, "Q4_0", "ab" * 32)
    return (lambda: models._embedded("fake", source)[0]), calls


def zero_block(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\0" * 4096)


def random_block(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.seek(path.stat().st_size // 3)
        handle.write(os.urandom(4096))


def truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [zero_block, random_block, truncate, lambda p: p.unlink()])
def test_damaged_converted_cache_is_rebuilt(embedded, damage):
    convert, calls = embedded
    target = convert()
    assert len(calls) == 1 and models.cache_problem(target) is None
    assert convert() == target and len(calls) == 1  # verified, reused
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    damage(weights)
    with pytest.warns(UserWarning, match="cannot be trusted .*rebuilding it"):
        convert()
    assert len(calls) == 2 and weights.read_bytes() == good
    assert models.load_model(str(target), device="cpu").info.arch == "LlamaForCausalLM"


def test_a_concurrent_conversion_never_replaces_a_valid_cache_in_use(embedded, tiny_model_dir):
    convert, calls = embedded
    target = convert()
    inode = (target / "model.safetensors").stat().st_ino
    models.install_converted(lambda tmp: [shutil.copy(p, tmp) for p in tiny_model_dir.iterdir()], target)
    assert (target / "model.safetensors").stat().st_ino == inode and models.cache_problem(target) is None


def test_converted_cache_without_manifest_is_rebuilt(embedded):
    convert, calls = embedded
    target = convert()
    (target / models.MANIFEST).unlink()
    with pytest.warns(UserWarning, match="no manifest"):
        convert()
    assert len(calls) == 2 and (target / models.MANIFEST).is_file()


def test_sha256_memo_never_vouches_for_a_file_rewritten_within_the_timestamp_granularity(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSINK_CACHE", str(tmp_path / "qcache"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    first = models.sha256_file(path)
    path.write_bytes(b"b" * 100)  # same size, possibly the same mtime
    assert models.sha256_file(path) != first


# --------------------------------------------------------------------------- 3. tokenizer in the identity


def swap_token_ids(directory: Path, text: str = "The") -> None:
    """Exchange the ids of two vocabulary entries that ``text`` tokenizes to, in tokenizer.json."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(directory).tokenize(text)[:2]
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))


def test_local_model_identity_includes_the_tokenizer(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = models._directory_sha(copy)
    assert before == models._directory_sha(tiny_model_dir)
    swap_token_ids(copy)
    assert models._directory_sha(copy) != before


def test_reference_cache_is_keyed_on_the_windows_scored(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """Even with an identity that misses the tokenizer, a changed tokenization never reuses the reference."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    monkeypatch.setattr(models, "_directory_sha", lambda directory: "same" * 16)
    config = tiny_config(copy, tiny_text_file, tmp_path / "runs")
    assert run(config, write=False).reference.cached is False
    assert run(config, write=False).reference.cached is True
    swap_token_ids(copy, tiny_text_file.read_text()[:200])
    assert run(config, write=False).reference.cached is False


# --------------------------------------------------------------------------- 4. report of nothing


@pytest.mark.parametrize("make_results,code", [(lambda root: root / "typo", 2),
                                               (lambda root: (root / "empty").mkdir() or root / "empty", 1)])
def test_report_of_missing_or_empty_results_writes_nothing(tmp_path, make_results, code):
    write_report(_one_record(tmp_path / "runs"), tmp_path / "out")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- leaderboard:start -->\nold table\n<!-- leaderboard:end -->\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    result = runner.invoke(app, ["report", "--results", str(make_results(tmp_path)), "--out", str(tmp_path / "out"),
                                 "--readme", str(readme)])
    assert result.exit_code == code, result.output
    assert "nothing written" in result.output and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert "old table" in readme.read_text()


def _one_record(root: Path) -> Path:
    write_record(make_record(), root)
    return root


# --------------------------------------------------------------------------- 5. CSV formula injection


def test_csv_cells_that_would_start_a_formula_are_neutralised(tmp_path):
    runs = tmp_path / "runs"
    write_record(make_record(model="=HYPERLINK(\"http://x\")", corpus="@SUM(A1)", scheme="+1", mitigation="-2"), runs)
    write_record(make_record(model="plain", ppl=0.5, ppl_ref=10.0), runs)  # a negative delta stays a number
    write_report(runs, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "leaderboard.csv").open()))
    hostile = next(r for r in rows if r["model"] != "plain")
    assert hostile["model"] == "'=HYPERLINK(\"http://x\")" and hostile["corpus"] == "'@SUM(A1)"
    assert hostile["scheme"] == "'+1" and hostile["mitigation"] == "'-2"
    plain = next(r for r in rows if r["model"] == "plain")
    assert float(plain["delta_bpb"]) < 0


def test_cli_reports_a_corrupt_reference_cache_in_one_line(tiny_model_dir, tiny_text_file, tmp_path):
    args = ["eval", "--model", str(tiny_model_dir), "--corpus", f"file:{tiny_text_file}", "--scheme", "int8",
            "--window", "32", "--max-tokens", "128", "--no-stats", "--no-write", "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    [entry] = Path(os.environ["QUANTSINK_REFERENCE_CACHE"]).glob("*.safetensors")
    overwrite_tensor(entry, "nbytes", struct.pack("<q", 10**9))
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "reference cache" in line]
    assert lines == [f"warning: reference cache {entry.name} is corrupt (digest mismatch); recomputing it"]
    assert "UserWarning" not in result.output
