"""A hub model's identity comes from the weights of the revision it resolves to (issue 31, case 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from quantsink.config import RunConfig
from quantsink.data.models import load_model, model_sha256
from quantsink.errors import QuantsinkError
from quantsink.pipeline.plan import canonical


def _snapshot(cache: Path, repo: str, revision: str, source: Path, scale: float = 1.0) -> Path:
    """A local hub-cache snapshot ``models--org--name/snapshots/<rev>`` with ``refs/main`` -> rev."""
    from safetensors.torch import load_file, save_file

    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / revision
    shutil.copytree(source, snapshot)
    if scale != 1.0:  # one layer's weights scaled: same tokenizer, other numbers
        weights = snapshot / "model.safetensors"
        tensors = load_file(weights)
        name = next(n for n in sorted(tensors) if "layers.0.mlp.down_proj" in n)
        tensors[name] = tensors[name] * scale
        save_file(tensors, weights, metadata={"format": "pt"})
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_models_with_one_tokenizer_have_distinct_identities(hub_cache, tiny_model_dir):
    _snapshot(hub_cache, "org/base", "a" * 40, tiny_model_dir)
    _snapshot(hub_cache, "org/scaled", "b" * 40, tiny_model_dir, scale=3.0)
    base, scaled = model_sha256("org/base", offline=True), model_sha256("org/scaled", offline=True)
    assert len(base) == 64 and len(scaled) == 64 and base != scaled
    loaded = load_model("org/scaled", device="cpu", offline=True)
    assert loaded.info.sha256 == scaled and loaded.info.source == f"hub:org/scaled@{'b' * 40}"


def test_a_new_revision_of_one_repo_is_a_new_identity(hub_cache, tiny_model_dir):
    _snapshot(hub_cache, "org/model", "a" * 40, tiny_model_dir)
    before = model_sha256("org/model", offline=True)
    _snapshot(hub_cache, "org/model", "c" * 40, tiny_model_dir, scale=3.0)  # refs/main moves on
    assert model_sha256("org/model", offline=True) != before


def test_a_hub_id_missing_offline_is_one_line(hub_cache):
    with pytest.raises(QuantsinkError) as err:
        model_sha256("org/absent", offline=True)
    assert "offline mode is on" in str(err.value) and "\n" not in str(err.value)


def test_an_alias_and_its_name_are_one_run():
    assert canonical(RunConfig(model="smollm2")).model == canonical(RunConfig(model="smollm2-135m")).model
    assert canonical(RunConfig(model="SmolLM2")).model == "smollm2-135m"
    assert canonical(RunConfig(model="org/name")).model == "org/name"
