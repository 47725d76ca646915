import pytest

from quantsink.errors import QuantsinkError, UsageError
from quantsink.models import load_model, resolve_device, torch_dtype


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
