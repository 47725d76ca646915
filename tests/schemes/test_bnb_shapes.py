"""bitsandbytes 4-bit on the CPU: a layer that its packed kernel cannot take (outputs not a multiple of 32) runs on
its generic path instead of failing, with the right weights; a blocksize that does not divide a layer's inputs
(which bitsandbytes' CPU kernels de-quantize wrongly) is refused in one line that names one that fits."""

import pytest
import torch

from quantsink.errors import UsageError
from quantsink.schemes import QuantContext, parse_scheme
from quantsink.schemes.bnb import packed_cpu_fits
from tests.tiny import tiny_llama


def test_which_layers_the_packed_kernel_takes():
    assert packed_cpu_fits(torch.nn.Linear(576, 192), 64)
    assert not packed_cpu_fits(torch.nn.Linear(576, 192), 128)  # smollm2 at blocksize 128: 576 inputs
    assert not packed_cpu_fits(torch.nn.Linear(64, 16), 64)  # 16 outputs


def by_hand(layer: torch.nn.Module, quant_type: str, blocksize: int) -> torch.Tensor:
    """The layer's weight from its 4-bit codes and block scales, without bitsandbytes' de-quantization."""
    import bitsandbytes.functional as F

    state = layer.weight.quant_state
    codes = layer.weight.data.reshape(-1)
    if getattr(state, "packing_format_for_cpu", False):
        pytest.fail("the layer took the packed kernel")
    index = torch.stack([codes >> 4, codes & 0xF], 1).reshape(-1).long()
    values = F.get_4bit_type(quant_type, device="cpu")[index].reshape(-1, blocksize)
    return (values * state.absmax.float()[:, None]).reshape(layer.out_features, layer.in_features)


@pytest.mark.parametrize("spec,quant_type,blocksize", [("nf4", "nf4", 64), ("fp4:blocksize=32", "fp4", 32)])
def test_a_layer_the_packed_kernel_cannot_take_runs_with_the_right_weights(spec, quant_type, blocksize):
    model = tiny_llama(320, hidden=64, kv_heads=1)  # k/v projections: 16 outputs
    x = torch.randn(3, 64)
    weight = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    ctx = QuantContext()
    parse_scheme(spec).apply(model, ctx).eval()  # eval: the mode in which bitsandbytes takes its packed CPU kernel
    layer = model.model.layers[0].self_attn.k_proj
    with torch.inference_mode():
        out = layer(x)
        logits = model(input_ids=torch.randint(0, 320, (2, 16))).logits
    assert ctx.notes["cpu_generic_modules"] > 0 and torch.isfinite(logits).all()
    expected = by_hand(layer, quant_type, blocksize)
    assert torch.allclose(out, x @ expected.T, atol=1e-5)
    assert 0 < float((expected - weight).norm() / weight.norm()) < 0.15  # 4-bit error, not garbage


def test_a_blocksize_that_does_not_divide_the_inputs_is_refused_with_one_that_does():
    model = tiny_llama(320, hidden=96)
    with pytest.raises(UsageError, match=r"nf4:blocksize=128: a layer has 96 inputs.*use nf4:blocksize=32"):
        parse_scheme("nf4:blocksize=128").apply(model, QuantContext())


def test_a_run_refuses_it_before_any_pass(tiny_model_dir, tmp_path, monkeypatch):
    """The check runs after the model loads (``Scheme.check_model``), before the reference pass."""
    from quantsink.config import RunConfig
    from quantsink.pipeline import run as pipeline

    passes: list[int] = []
    original = pipeline.run_pass
    monkeypatch.setattr(pipeline, "run_pass", lambda *a, **k: passes.append(1) or original(*a, **k))
    config = RunConfig(model=str(tiny_model_dir), corpus="python-docs", window=32, max_tokens=128, stats=False,
                       noise_floor=False, scheme="nf4", results=str(tmp_path))  # the tiny model: 32 inputs
    with pytest.raises(UsageError, match=r"nf4:blocksize=64: a layer has 32 inputs.*use nf4:blocksize=32"):
        pipeline.run(config)
    assert passes == [] and not list(tmp_path.glob("*.json"))
