"""Shared fixtures: a tiny Llama built from a config (no download) and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: llama.cpp shares its OpenMP runtime
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 320


def train_tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE with ~320 tokens trained on CPython's bundled docs (offline, < 1 s)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [topics[k] for k in sorted(topics)][:20]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def build_tiny_llama(directory: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(directory)
    train_tiny_tokenizer(directory)
    return directory


@pytest.fixture(autouse=True)
def _private_reference_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty reference cache; embedded models keep the user cache (converted once)."""
    monkeypatch.setenv("QUANTSINK_REFERENCE_CACHE", str(tmp_path / "reference-cache"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:12]), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- CI: no silent skips

MISSING_TOOL = ("missing tool", "could not import")  # our own reason prefix; pytest.importorskip's default


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _missing_tool(report: pytest.TestReport) -> bool:
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return any(marker in reason.lower() for marker in MISSING_TOOL)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Under ``CI=true`` a skip for a missing tool (peer library, chromium) fails the test:
    CI installs every tool, so such a skip means a check silently stopped running."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _in_ci() and _missing_tool(report):
        report.outcome = "failed"
        report.longrepr = f"CI=true and a required tool is missing: {report.longrepr}"
