"""Real runs through the sweep on a tiny Llama built from a config (no download):
planned run ids match the records', the reference pass is computed once per
(model, corpus) even with two worker processes, and a re-run runs nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantsink.config import RunConfig
from quantsink.sweep.grid import Grid
from quantsink.pipeline.execute import plan
from quantsink.sweep.local import sweep

TEXT = ("def add(a, b):\n    return a + b\n\n" * 40 + "The sink token takes the attention of dormant heads. " * 40)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) and a 200-token BPE tokenizer trained on TEXT, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>")
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture
def corpora(tmp_path) -> list[str]:
    docs, code = tmp_path / "docs.txt", tmp_path / "code.txt"
    docs.write_text(TEXT[len(TEXT) // 2:])
    code.write_text(TEXT[: len(TEXT) // 2])
    return [f"file:{docs}", f"file:{code}"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSINK_CACHE", str(tmp_path / "cache"))


def _configs(model: Path, corpora: list[str], results: Path) -> list[RunConfig]:
    grid = Grid.from_mapping({"models": [str(model)], "corpora": corpora, "schemes": ["fp32", "bf16"],
                              "window": 16, "max_tokens": 64, "calib_windows": 1, "device": "cpu"})
    return grid.configs({"results": str(results)})


def _records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def test_planned_run_id_is_the_records_run_id(tiny_model, corpora, tmp_path):
    from quantsink.pipeline.plan import Identities, canonical
    from quantsink.pipeline.run import run

    planned_run_id = Identities().run_id
    config = RunConfig(model=str(tiny_model), corpus=corpora[0], scheme="BF16", window=16, max_tokens=64,
                       calib_windows=1, device="cpu", results=str(tmp_path / "runs"))
    assert run(config, write=False).run_id == planned_run_id(canonical(config))
    assert planned_run_id(canonical(config.replace(scheme="fp32"))) != planned_run_id(canonical(config))


@pytest.mark.parametrize("jobs", [1, 2])
def test_real_sweep_computes_each_reference_once_and_resumes(tiny_model, corpora, tmp_path, jobs):
    results = tmp_path / "runs"
    planned = plan(_configs(tiny_model, corpora, results))
    summary = sweep(planned, results, jobs=jobs)
    assert summary.ok and len(summary.done) == 4, summary
    records = _records(results)
    assert sorted(r["run_id"] for r in records) == sorted(p.run_id for p in planned)
    for corpus in corpora:
        fresh = [r for r in records if r["config"]["corpus"] == corpus and not r["reference"]["cached"]]
        assert len(fresh) == 1  # the group's first run computed the reference; the other read the cache
    fp32 = [r for r in records if r["scheme"]["name"] == "fp32"]
    assert all(r["candidate"]["kl"] == pytest.approx(0, abs=1e-6) for r in fp32)
    again = sweep(planned, results, jobs=jobs)
    assert again.ok and again.skipped == 4 and not again.done
