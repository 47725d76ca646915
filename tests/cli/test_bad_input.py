"""Issue 12: bad input is refused before the work, in one line (exit 2 for usage, 1 for runtime)."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantsink.data import models
from quantsink.cli import app
from quantsink.config import RunConfig
from quantsink.data.corpus import load_corpus
from quantsink.errors import QuantsinkError, UsageError
from quantsink.report.leaderboard import write_report
from quantsink.records.store import write_record
from quantsink.schemes import parse_scheme
from quantsink.sweep.grid import load_grid
from synthetic_records import make_record

runner = CliRunner()
run_mod = importlib.import_module("quantsink.pipeline.run")  # the module (the package exports a function `run`)


def one_line_error(result, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- corpora


@pytest.mark.parametrize("value,kind", [(3, "a number"), (None, "null"), (["a"], "a list"), ({"x": 1}, "an object")])
def test_jsonl_text_that_is_not_a_string_is_refused(tmp_path, value, kind):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(QuantsinkError, match=f"c.jsonl:2: 'text' is {kind}, not a string"):
        load_corpus(f"file:{path}")


@pytest.mark.parametrize("suffix,body", [(".jsonl", '{"text": "hello world"}\n'), (".txt", "hello world")])
def test_a_utf8_byte_order_mark_is_not_text(tmp_path, suffix, body):
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(body, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_corpus(f"file:{marked}").documents == ("hello world",)
    assert load_corpus(f"file:{marked}").sha256 == load_corpus(f"file:{plain}").sha256


def test_corpus_file_that_is_a_directory(tmp_path):
    with pytest.raises(QuantsinkError, match="is a directory: give file:PATH"):
        load_corpus(f"file:{tmp_path}")


# --------------------------------------------------------------------------- models


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors_is_one_line(model_copy, damage):
    weights = model_copy / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(5000) if damage == "truncate" else handle.write(b"\xff" * 16)
    result = runner.invoke(app, ["eval", "--model", str(model_copy), "--no-write"])
    one_line_error(result, 2, "model.safetensors: not a readable safetensors file")


def test_unknown_architecture_is_one_line(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "model_type": "nonsense"}))
    with pytest.raises(QuantsinkError, match="cannot load model .*model type `nonsense`"):
        models.load_model(str(model_copy), device="cpu")


# --------------------------------------------------------------------------- windows


def tiny_run(model_dir: Path, corpus: Path, tmp_path: Path, **kw):
    config = dict(model=str(model_dir), corpus=f"file:{corpus}", scheme="int8", window=32, max_tokens=128,
                  stats=False, device="cpu", results=str(tmp_path / "runs"))
    return run_mod.run(RunConfig(**{**config, **kw}))


def test_window_longer_than_the_context_is_refused(tiny_model_dir, tiny_text_file, tmp_path):
    with pytest.raises(UsageError, match="exceed the model's context \\(max_position_embeddings 1024\\)"):
        tiny_run(tiny_model_dir, tiny_text_file, tmp_path, window=1100, max_tokens=1100)


def test_lm_eval_windows_as_long_as_the_context_are_taken(tiny_model_dir, tiny_text_file):
    """lm-eval's rows hold window + 1 tokens but feed the model ``window`` (as HFLM): a window of the whole
    context is taken, as lm-eval takes it (a row of 1,025 fed whole was refused)."""
    config = RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", scheme="int8", window=1024,
                       max_tokens=1024, stats=False, device="cpu", protocol="lm-eval")
    session = run_mod.Session()  # the model and corpus load once
    prep = run_mod.prepare(config, session)
    assert prep.windows.input_ids.shape[1] == 1025 and prep.windows.fed_width == 1024
    with pytest.raises(UsageError, match="use --window 1024 or less"):  # the hint fits this protocol
        run_mod.prepare(config.replace(window=1025, max_tokens=1025), session)


def test_window_whose_forward_cannot_fit_in_memory_is_refused(tiny_model_dir, tiny_text_file, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(models, "available_memory", lambda model: 10**5)
    with pytest.raises(QuantsinkError, match="need at least .* GiB per forward .*lower --window"):
        tiny_run(tiny_model_dir, tiny_text_file, tmp_path)
    assert not (tmp_path / "runs").exists()


def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(run_mod, "load_model", refuse)


@pytest.mark.parametrize("where,message", [("file", "is a file; give a directory"),
                                           ("file/sub", "is under .*file, which is a file")])
def test_results_that_cannot_be_a_directory_are_refused_before_the_load(tiny_model_dir, tmp_path, monkeypatch,
                                                                        where, message):
    (tmp_path / "file").write_text("x")
    no_load(monkeypatch)
    with pytest.raises(UsageError, match=message):
        run_mod.run(RunConfig(model=str(tiny_model_dir), results=str(tmp_path / where)))


def test_results_that_is_not_writable_is_refused_before_the_load(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as root every directory is writable
    no_load(monkeypatch)
    with pytest.raises(QuantsinkError, match="is not writable; give a directory you can write to"):
        run_mod.run(RunConfig(model=str(tiny_model_dir), results=str(tmp_path / "runs")))


def test_eval_path_refuses_results_under_a_file_before_the_load(tiny_model_dir, tmp_path, monkeypatch):
    """``quantsink eval`` runs through sweep.run_config (its runs do not write themselves): same one-line check."""
    from quantsink import evaluate

    (tmp_path / "file").write_text("x")
    no_load(monkeypatch)
    with pytest.raises(UsageError, match="is under .*file, which is a file"):
        evaluate(RunConfig(model=str(tiny_model_dir), results=str(tmp_path / "file" / "sub")))


def test_report_out_that_is_a_file(tmp_path):
    write_record(make_record(), tmp_path / "runs")
    (tmp_path / "out").write_text("x")
    result = runner.invoke(app, ["report", "--results", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    one_line_error(result, 2, "is a file; give a directory")


# --------------------------------------------------------------------------- scheme parameters


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_scheme_parameters_are_refused(value):
    with pytest.raises(UsageError, match=f"int8:threshold: '{value}' is not a finite number"):
        parse_scheme(f"int8:threshold={value}")


@pytest.mark.parametrize("group,ok", [(4, True), (8, True), (5, False), (16, False), (32, False)])
def test_kv_group_must_tile_the_heads(tiny_model_dir, group, ok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # head dim 8, KV width 16
    scheme = parse_scheme(f"kv8:kv_group={group}")
    if ok:
        scheme.check_model(model)
    else:
        with pytest.raises(UsageError, match=f"kv_group={group} must divide the head dim \\(8; KV width 16\\)"):
            scheme.check_model(model)
    parse_scheme(f"kv8:k_gran=channel,v_gran=channel,kv_group={group}").check_model(model)  # token blocks


# --------------------------------------------------------------------------- grids and sweeps


@pytest.mark.parametrize("line,message", [
    ("window: abc", "--window 'abc': expected an integer"), ("max_tokens: 1e3", "--max-tokens '1e3': expected an integer"),
    ("window: 128.0", "--window 128.0: expected an integer"), ("stats: 'no'", "--stats 'no': expected true or false"),
    ("stride: true", "--stride True: expected an integer or none"), ("jobs: abc", "jobs 'abc': expected an integer"),
    ("jobs: 0", "jobs 0: expected an integer >= 1"), ("results: [a]", "--results ['a']: expected a string"),
])
def test_grid_values_have_strict_types(tmp_path, line, message):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"schemes: [int8]\n{line}\n")
    with pytest.raises(UsageError, match=f"grid.yaml: {message.replace('[', '.').replace(']', '.')}"):
        load_grid(grid)


def test_grid_with_an_unknown_model_exits_2(tmp_path):
    result = runner.invoke(app, ["sweep", "--models", "smollm3", "--schemes", "int8", "--results", str(tmp_path)])
    one_line_error(result, 2, "unknown model 'smollm3'")


def test_dry_run_flags_scheme_mitigation_pairs_that_cannot_apply(tiny_model_dir, tmp_path):
    args = ["sweep", "--models", str(tiny_model_dir), "--corpora", "python-docs", "--schemes", "int8,w8a8",
            "--mitigations", "none,sink-fp", "--results", str(tmp_path / "runs")]
    dry = runner.invoke(app, args + ["--dry-run"], terminal_width=400)
    assert dry.exit_code == 0, dry.output
    invalid = [line for line in dry.output.splitlines() if "invalid:" in line]
    assert len(invalid) == 1 and "int8" in invalid[0] and "sink-fp" in invalid[0]
    one_line_error(runner.invoke(app, args), 2, "1 run(s) pair a scheme with a mitigation that cannot apply")


def test_device_is_checked_before_any_load(monkeypatch, tmp_path):
    with pytest.raises(UsageError, match="--device 'tpu': use auto, cpu or cuda"):
        RunConfig(device="tpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = runner.invoke(app, ["sweep", "--schemes", "int8", "--device", "cuda", "--results", str(tmp_path)])
    one_line_error(result, 2, "no CUDA device is available here")
    no_load(monkeypatch)
    monkeypatch.setattr(run_mod.Session, "corpus", lambda *a: pytest.fail("the corpus was loaded first"))
    with pytest.raises(QuantsinkError, match="no CUDA device is available here"):
        run_mod.run(RunConfig(device="cuda:1"), write=False)


def test_unknown_lm_eval_task_is_refused_before_the_load(tiny_model_dir, monkeypatch):
    no_load(monkeypatch)
    with pytest.raises(UsageError, match="unknown lm-eval task 'python-doc'. Did you mean 'python-docs'"):
        run_mod.run(RunConfig(model=str(tiny_model_dir), lm_eval="python-doc"), write=False)


# --------------------------------------------------------------------------- report


def test_report_skips_a_directory_named_json_and_a_record_of_the_wrong_shape(tmp_path):
    runs = tmp_path / "runs"
    write_record(make_record(), runs)
    (runs / "odd.json").mkdir()
    wrong = make_record(scheme="nf4")
    (runs / f"{wrong.run_id}.json").write_text(json.dumps({**wrong.to_dict(), "reference": [1, 2]}))
    odd = make_record(scheme="fp4").to_dict()
    odd["stats"]["changes"] = [1]  # a list where the schema has an object
    (runs / f"{odd['run_id']}.json").write_text(json.dumps(odd))
    with pytest.warns(UserWarning) as caught:
        written = write_report(runs, tmp_path / "out")
    messages = " | ".join(str(w.message) for w in caught)
    assert "odd.json: a directory, not a results file" in messages
    assert ".reference: not a JSON object" in messages and "stats.changes: expected a JSON object" in messages
    assert written.n_rows == 1 and written.n_skipped == 3


def test_schema_version_as_a_string_is_not_called_newer(tmp_path):
    from quantsink.records.store import load_record

    path = tmp_path / "x.json"
    path.write_text(json.dumps({**make_record().to_dict(), "schema_version": "1"}))
    with pytest.raises(QuantsinkError, match="not a quantsink record"):
        load_record(path)
