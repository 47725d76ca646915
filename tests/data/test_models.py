import pytest

from quantsink.errors import QuantsinkError, UsageError
from quantsink.data.models import load_model, resolve_device, torch_dtype


def test_local_directory_loads_from_safetensors(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.info.arch == "LlamaForCausalLM"
    assert loaded.info.n_params == sum(p.numel() for p in loaded.model.parameters())
    assert len(loaded.info.sha256) == 64 and loaded.info.source.startswith("local:")
    assert not loaded.model.training
    # the hash is a content hash: same directory, same digest
    assert load_model(str(tiny_model_dir), device="cpu").info.sha256 == loaded.info.sha256


def test_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(QuantsinkError, match="never loads pickles"):
        load_model(str(tmp_path))


def test_unknown_alias_and_bad_device_dtype():
    with pytest.raises(UsageError, match="Valid models: smollm2-135m, gemma3-270m"):
        load_model("smollm3")
    with pytest.raises(QuantsinkError, match="use auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(QuantsinkError, match="use float32, bfloat16 or float16"):
        torch_dtype("int3")


def test_auto_device_follows_cuda_availability():
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


class _Refused(OSError):
    pass


@pytest.fixture
def hub_calls(monkeypatch):
    """Record the local_files_only of every from_pretrained call; the hub is never reached."""
    import transformers

    calls = []

    def fake(where, **kwargs):
        calls.append((where, kwargs.get("local_files_only")))
        raise _Refused("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    return calls


def test_hub_id_goes_to_the_hub_unless_offline(monkeypatch):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("local_files_only")))
        raise _Refused("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(QuantsinkError, match="cannot load model 'org/name'"):
        load_model("org/name", device="cpu")
    with pytest.raises(QuantsinkError) as err:
        load_model("org/name", device="cpu", offline=True)
    assert "offline mode is on" in str(err.value) and "\n" not in str(err.value)
    assert calls == [("org/name", False), ("org/name", True)]


def test_local_directory_never_asks_the_hub(hub_calls, tiny_model_dir):
    with pytest.raises(QuantsinkError):
        load_model(str(tiny_model_dir), device="cpu")
    assert hub_calls == [(str(tiny_model_dir), True)]


def test_offline_comes_from_the_option_or_the_environment(monkeypatch):
    from quantsink.config import RunConfig
    from quantsink.pipeline.plan import canonical

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert canonical(RunConfig()).offline is False and canonical(RunConfig(offline=True)).offline is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert canonical(RunConfig()).offline is True
