"""lm-eval integration: rolling windows, local tasks, agreement, refusal.

Unit tests use a tiny Llama and a tiny byte-level BPE tokenizer built in memory
(no download); the slow test checks the 0.5% agreement on smollm2-135m.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from quantsink.pipeline import lmeval
from quantsink.config import RunConfig
from quantsink.data.corpus import TokenStream, load_corpus
from quantsink.data.windows import rolling_rows, rolling_windows
from quantsink.errors import QuantsinkError, UsageError
from quantsink.measure.passes import run_pass
from quantsink.mitigations import MITIGATIONS, Mitigation
from quantsink.data.models import LoadedModel, ModelInfo

METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")  # what a local task reports


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models: one thread (on a loaded 2-core machine, 2 threads make tiny ops ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTSINK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny_tokenizer(add_bos: bool) -> Any:
    """A 300-token byte-level BPE trained on a slice of python-docs; BOS added or not by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(load_corpus("python-docs").documents[:4], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    tok = tiny_tokenizer(add_bos=request.param)
    return LoadedModel(tiny_model(len(tok)), tok, ModelInfo("tiny", "memory", f"tiny-{request.param}"))


# --------------------------------------------------------------------------- windows


def lm_eval_pairs(tokens: list[int], prefix: int, length: int) -> list[tuple[list[int], list[int]]]:
    """What HFLM feeds the model per window: (model input, scored targets)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    out = []
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, length, 1)):
        out.append(((ctx + cont)[-(length + 1):][:-1], cont))
    return out


@pytest.mark.parametrize("length", [1, 2, 4, 7])
def test_rolling_windows_are_lm_eval_windows(length: int) -> None:
    rng = random.Random(length)
    for n in [1, 2, length - 1, length, length + 1, 2 * length, 2 * length + 3, 5 * length + 1]:
        if n < 1:
            continue
        doc = [rng.randrange(10, 99) for _ in range(n)]
        windows = rolling_windows([TokenStream(doc, [1] * n)], length=length, prefix=7, pad=0)
        ours = []
        for ids, mask, scored in zip(windows.input_ids, windows.attention_mask, windows.scored):
            ids = ids[mask.bool()].tolist()
            ours.append((ids[:-1], [t for t, s in zip(ids, scored.tolist()) if s]))
        assert sorted(ours) == sorted(lm_eval_pairs(doc, 7, length)), (n, length)
        assert windows.n_scored == n and int(windows.nbytes.sum()) == n
        assert len(rolling_rows(n, length)) == len(ours)


def test_rolling_windows_pad_and_order() -> None:
    docs = [TokenStream([5, 6], [1, 2]), TokenStream(list(range(10, 20)), [1] * 10)]
    windows = rolling_windows(docs, length=4, prefix=1, pad=0)
    lengths = windows.attention_mask.sum(1).tolist()
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] == 3  # [P 5 6] last, padded
    assert windows.input_ids[-1].tolist() == [1, 5, 6, 0, 0]
    assert not (windows.scored & ~windows.attention_mask.bool()).any()  # pads never scored
    assert windows.subset(slice(3, 4)).trimmed().input_ids.shape == (1, 3)
    assert int(windows.nbytes.sum()) == 13


def test_padding_does_not_change_nll(tiny: LoadedModel) -> None:
    texts = list(load_corpus("python-docs").documents[:3])
    texts = [texts[0][:200], texts[1][:900], texts[2][:50]]
    windows = lmeval.document_windows(texts, tiny.tokenizer, 64)
    batched = run_pass(tiny.model, windows, batch_tokens=10_000)
    for i in range(len(windows)):
        alone = run_pass(tiny.model, windows.subset(slice(i, i + 1)).trimmed())
        assert torch.allclose(alone.nll, batched.nll[i:i + 1], rtol=1e-5, atol=1e-5)
    assert int(windows.nbytes.sum()) == sum(len(t.encode()) for t in texts)


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", ["python-docs", "python-code"])
def test_local_task_yaml_loads_in_lm_eval(name: str) -> None:
    task = lmeval.TASKS.get(name)
    folder = lmeval.materialize(task)
    manager = lmeval.task_manager([name])
    assert name in manager.all_tasks
    loaded = lmeval.load_tasks([name], manager)[name]
    assert loaded.OUTPUT_TYPE == "loglikelihood_rolling"
    assert loaded.config.metadata["version"] == task.config()["metadata"]["version"]
    assert loaded.config.metadata["quantsink"]["corpus"] == name
    docs = [d["text"] for d in loaded.test_docs()]
    assert docs == list(load_corpus(name).documents)
    assert {m["metric"] for m in loaded.config.metric_list} == set(METRICS)
    assert (folder / f"{name}.jsonl").read_bytes() == (lmeval.materialize(task) / f"{name}.jsonl").read_bytes()


def test_materialize_is_deterministic(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    task = lmeval.TASKS.get("python-docs")
    first = lmeval.materialize(task)
    monkeypatch.setenv("QUANTSINK_CACHE", str(tmp_path))
    second = lmeval.materialize(task)
    assert first != second
    for name in ("python-docs.jsonl",):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    line = json.loads((second / "python-docs.jsonl").read_text().splitlines()[0])
    assert set(line) == {"text"}


@pytest.fixture(scope="module")
def with_builtins() -> Any:
    """A TaskManager that indexes lm-eval's built-in tasks too (slow to build: shared)."""
    return lmeval.task_manager(["wikitext"])


def test_hub_task_fails_offline_in_one_line(with_builtins: Any) -> None:
    names = lmeval.task_names("wikitext")
    with pytest.raises(QuantsinkError) as err:
        lmeval.load_tasks(names, with_builtins)
    message = str(err.value)
    assert "hub" in message and "python-docs" in message and "\n" not in message


def test_unknown_task_suggests_close_match(with_builtins: Any) -> None:
    names = lmeval.task_names("python-doc")
    with pytest.raises(UsageError, match="python-docs"):
        lmeval.load_tasks(names, with_builtins)
    with pytest.raises(UsageError):
        lmeval.task_names(" , ")


def test_config_validates_lm_eval_options() -> None:
    with pytest.raises(UsageError, match="lm-eval-limit"):
        RunConfig(lm_eval="python-docs", lm_eval_limit=0)
    with pytest.raises(UsageError, match="stride"):
        RunConfig(protocol="lm-eval", stride=128)
    assert RunConfig(lm_eval="python-docs", lm_eval_limit=3).identity()["lm_eval_limit"] == 3


def test_cli_lists_tasks_and_options() -> None:
    from typer.testing import CliRunner

    from quantsink.cli import app

    listed = CliRunner().invoke(app, ["list", "tasks"])
    assert listed.exit_code == 0 and "python-docs" in listed.output and "wikitext" in listed.output
    helped = CliRunner().invoke(app, ["eval", "--help"])
    assert "--lm-eval" in helped.output and "--lm-eval-limit" in helped.output


# --------------------------------------------------------------------------- agreement and runs


def test_lm_eval_agrees_with_quantsink_on_tiny(tiny: LoadedModel) -> None:
    out = lmeval.evaluate_model(tiny.model, tiny.tokenizer, ["python-docs"], limit=2, max_length=64,
                                batch_tokens=512)["python-docs"]
    assert out["n_documents"] == 2 and out["task_version"] == 1.0 and out["lm_eval_version"]
    assert abs(out["bpb_rel_diff"]) < 1e-5
    assert out["bits_per_byte"] > 1.0  # an untrained model is far from the text


@dataclass(frozen=True)
class InputChanger(Mitigation):
    """Test stand-in for a mitigation that changes the model's input (e.g. a sink token)."""

    changes_input: ClassVar[bool] = True


@dataclass(frozen=True)
class WrappedInputChanger(InputChanger):
    def wrap_for_lm_eval(self, model: Any, tokenizer: Any) -> Any:
        return model


if "test-input-changer" not in MITIGATIONS:
    MITIGATIONS.register("test-input-changer", InputChanger(name="test-input-changer"), help="tests only")


def test_input_change_without_a_wrapper_is_refused() -> None:
    with pytest.raises(QuantsinkError, match="'u'"):
        lmeval.check(["python-docs"], [InputChanger(name="u")])
    lmeval.check(["python-docs"], [WrappedInputChanger(name="w"), Mitigation(name="m")])


def test_every_mitigation_that_changes_windows_declares_it() -> None:
    for entry in MITIGATIONS:
        overrides = type(entry.obj).transform_windows is not Mitigation.transform_windows
        assert not overrides or entry.obj.changes_input, entry.name


def test_sink_token_reaches_lm_eval_through_its_wrapper(tiny: LoadedModel) -> None:
    kwargs = dict(limit=2, max_length=64, batch_tokens=512)
    plain = lmeval.evaluate_model(tiny.model, tiny.tokenizer, ["python-docs"], **kwargs)["python-docs"]
    from quantsink.mitigations import MitigationStack
    from quantsink.mitigations.sink_token import SinkToken

    stack = MitigationStack.of([SinkToken(name="sink-token", token=2)], reference=tiny.model,
                               tokenizer=tiny.tokenizer, scheme=None, calibration=None)
    sunk = lmeval.evaluate_model(tiny.model, tiny.tokenizer, ["python-docs"], mitigations=stack,
                                 **kwargs)["python-docs"]
    assert abs(sunk["bpb_rel_diff"]) < 1e-5  # lm-eval saw the sink token quantsink's windows have
    assert sunk["bits_per_byte"] != plain["bits_per_byte"]


def session_with(loaded: LoadedModel) -> Any:
    from quantsink.pipeline.run import Session

    return Session(models={("tiny", "auto", "float32", False): loaded})


def test_lm_eval_refuses_input_changing_mitigation(tiny: LoadedModel) -> None:
    from quantsink.pipeline.run import run

    config = RunConfig(model="tiny", scheme="bf16", mitigation="test-input-changer", window=32, max_tokens=64,
                       lm_eval="python-docs", lm_eval_limit=1)
    with pytest.raises(QuantsinkError, match="test-input-changer.*changes the model's input"):
        run(config, session=session_with(tiny), write=False)
    wrapped = WrappedInputChanger(name="wrapped")
    assert lmeval.lm_eval_model(tiny.model, tiny.tokenizer, [wrapped]) is tiny.model


def test_run_records_lm_eval_both_sides(tiny: LoadedModel, tmp_path: Any) -> None:
    from quantsink.pipeline.run import run

    config = RunConfig(model="tiny", scheme="bf16", protocol="lm-eval", window=64, max_tokens=256,
                       lm_eval="python-docs", lm_eval_limit=1, results=str(tmp_path))
    record = run(config, session=session_with(tiny)).to_dict()
    for side in ("reference", "candidate"):
        entry = record[side]["lm_eval"]["python-docs"]
        assert set(METRICS) <= set(entry) and abs(entry["bpb_rel_diff"]) < 1e-3
        assert entry["lm_eval_version"] and entry["task_version"] == 1.0 and entry["limit"] == 1
    assert record["protocol"]["kind"] == "lm-eval" and record["protocol"]["n_documents"] >= 1
    assert record["candidate"]["lm_eval"]["python-docs"]["bits_per_byte"] != \
        record["reference"]["lm_eval"]["python-docs"]["bits_per_byte"]
    again = run(config, session=session_with(tiny), write=False)
    assert again.reference.lm_eval_cached is True
    assert again.reference.lm_eval == record["reference"]["lm_eval"]
    saved = json.loads((tmp_path / f"{record['run_id']}.json").read_text())
    assert saved["candidate"]["lm_eval"]["python-docs"]["n_documents"] == 1


@pytest.mark.slow
def test_lm_eval_agreement_smollm2() -> None:
    from quantsink.data.models import load_model

    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    out = lmeval.evaluate_model(loaded.model, loaded.tokenizer, ["python-docs"], limit=2, max_length=256,
                                batch_tokens=1024)["python-docs"]
    assert out["n_documents"] == 2
    assert abs(out["bpb_rel_diff"]) < 1e-5  # docs/protocols.md: 4e-8 measured
    assert 0.5 < out["bits_per_byte"] < 2.0


# --------------------------------------------------------------------------- the user's own tasks


def user_task(folder: Any, name: str = "my_task") -> Any:
    """A tiny rolling-loglikelihood task of the user's: its YAML and two JSONL documents in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_corpus("python-docs").documents[:2]))
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                         "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\n"
                         "doc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n"
                         "  - metric: bits_per_byte\nmetadata:\n  version: 2.0\n")
    return yaml_path


def test_user_task_by_include_path_and_by_yaml_path(tmp_path: Any) -> None:
    path = user_task(tmp_path / "tasks")
    by_folder = RunConfig(lm_eval="my_task", include_path=str(tmp_path / "tasks"))
    assert lmeval.user_tasks(by_folder) == (["my_task"], [str((tmp_path / "tasks").resolve())])
    by_file = RunConfig(lm_eval=f"{path},python-docs")
    assert lmeval.user_tasks(by_file) == (["my_task", "python-docs"], [str(path.resolve().parent)])
    lmeval.check_config(by_folder, [])
    lmeval.check_config(by_file, [])
    with pytest.raises(UsageError, match="unknown lm-eval task 'my_task'.*--include-path"):
        lmeval.check_config(RunConfig(lm_eval="my_task"), [])
    with pytest.raises(UsageError, match="no such folder"):
        lmeval.user_tasks(RunConfig(lm_eval="my_task", include_path=str(tmp_path / "nope")))
    with pytest.raises(UsageError, match="no such task file"):
        lmeval.user_tasks(RunConfig(lm_eval=str(tmp_path / "nope.yaml")))


def test_run_scores_a_user_task_and_writes_lm_evals_results(tiny: LoadedModel, tmp_path: Any) -> None:
    from quantsink.pipeline.run import run

    user_task(tmp_path / "tasks")
    config = RunConfig(model="tiny", scheme="bf16", protocol="lm-eval", window=64, max_tokens=256,
                       lm_eval="my_task", include_path=str(tmp_path / "tasks"), lm_eval_limit=1,
                       results=str(tmp_path / "runs"))
    record = run(config, session=session_with(tiny))
    entry = record.candidate.lm_eval["my_task"]
    assert entry["task_version"] == 2.0 and entry["n_documents"] == 1 and abs(entry["bpb_rel_diff"]) < 1e-3
    written = lmeval.write_results(record, tmp_path / "runs")
    assert [p.name for p in written] == [f"{record.run_id}.candidate.json", f"{record.run_id}.reference.json"]
    saved = json.loads(written[0].read_text())
    assert saved["results"]["my_task"]["bits_per_byte,none"] == entry["bits_per_byte"]
    assert saved["versions"]["my_task"] == 2.0 and saved["config"]["model"].endswith("(candidate)")
