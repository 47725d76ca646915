"""Peer checks: our simulated schemes against maintained libraries doing the same arithmetic on CPU.

* torchao ``IntxWeightOnlyConfig(int4, PerGroup(g), ASYMMETRIC)`` vs ``w4a16:group=g``:
  the de-quantized weights are bit-identical, so perplexities agree to 1e-4 relative.
* torchao ``Int8DynamicActivationInt8WeightConfig`` (dynamic per-token symmetric int8
  activations, per-channel symmetric int8 weights) vs ``w8a8-tok``: the grids differ in
  detail (torchao: -128..127 with scale absmax/127.5; ours: -127..127, absmax/127), so
  the two make rounding noise of the same size but uncorrelated (measured on smollm2
  layers 2 and 20: relative output error 0.025-0.030 for both, within 7% of each other).
  On 510 scored tokens that noise moves perplexity by a few percent: tolerance 5%.
* optimum-quanto static W8A8 (``qint8`` weights and activations, ``Calibration``) vs
  ``w8a8`` calibrated on the same windows: quanto's static ranges are a running average
  of per-batch absmax, ours the max over the calibration set, so agreement is looser: 10%.

Measured (torchao 0.18.0, optimum-quanto 0.2.7, smollm2-135m, 2 x 256 tokens of stdlib code,
reference ppl 13.52): w4a16:group=64 17.7355 vs torchao 17.7369; w8a8-tok 13.82 vs torchao 14.29;
w8a8 31.25 vs quanto 32.32 (2 calibration windows); re-measured 2026-11-28: w4a16 17.7355 vs 17.7369,
w8a8-tok 13.78 vs 14.14, w8a8 32.03 vs 34.05 (static per-tensor ranges are chaotic here: tolerance 10%).

Float formats, against torchao's reference code (``torchao.prototype.mx_formats``, CPU-capable):

* MXFP4: ``MXTensor.to_mx(x, float4_e2m1fn_x2, 32, FLOOR | RCEIL).dequantize()`` vs
  ``fake_mxfp4(x, rounding=floor | ceil)``: bit-identical.
* NVFP4: ``NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=amax / (448 * 6)).dequantize()`` vs
  ``fake_nvfp4``: bit-identical wherever torchao's clamp of block scales to E4M3's smallest normal
  (2^-6) does not bite; where it does, ours keeps the subnormal scale (TensorRT-LLM's kernel) and
  is the closer of the two to the input.
* FP8: torchao's ``_choose_scale_float8`` / ``_quantize_affine_float8`` per row vs ``fake_fp8(x, "row")``:
  bit-identical (both round with torch's ``float8_e4m3fn`` cast, so this checks scales and layout).

``make test`` installs the peers (the ``test`` extra includes ``peers``); on a machine without
them these checks skip with the reason "missing tool: ..." and under ``CI=true`` that skip is a
failure (``tests/conftest.py``).  quantsink itself never needs them.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from quantsink.schemes import QuantContext, default_filter, parse_scheme, quantize

VOCAB = 128
MISSING_PEERS = "missing tool: the peers extra (pip install -e '.[peers]', or make test)"


def _torchao():
    warnings.filterwarnings("ignore")
    return pytest.importorskip("torchao.quantization", reason=MISSING_PEERS)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def ours(model, spec: str, calibration=None):
    return quantize(parse_scheme(spec), copy.deepcopy(model), QuantContext(calibration=calibration))


def torchao_int4(model, group: int):
    ao = _torchao()
    peer = copy.deepcopy(model)
    ao.quantize_(peer, ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(group),
                                               mapping_type=ao.MappingType.ASYMMETRIC), filter_fn=default_filter)
    return peer


def torchao_w8a8(model):
    ao = _torchao()
    peer = copy.deepcopy(model)
    ao.quantize_(peer, ao.Int8DynamicActivationInt8WeightConfig(), filter_fn=default_filter)
    return peer


def test_w4a16_weights_bit_identical_to_torchao(tiny):
    peer = torchao_int4(tiny, 32)
    mine = ours(tiny, "w4a16:group=32")
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        theirs = peer.model.layers[1].get_submodule(name).weight.dequantize()
        assert torch.equal(mine.model.layers[1].get_submodule(name).weight, theirs)
    ids = torch.randint(0, VOCAB, (2, 16))
    assert torch.allclose(logits(mine, ids), logits(peer, ids), atol=1e-5)


def test_w8a8_tok_matches_torchao_on_tiny(tiny):
    ids = torch.randint(0, VOCAB, (2, 32))
    ref = logits(tiny, ids)
    mine, peer = logits(ours(tiny, "w8a8-tok"), ids), logits(torchao_w8a8(tiny), ids)
    err_mine, err_peer = (mine - ref).abs().mean(), (peer - ref).abs().mean()
    assert 0.8 < err_mine / err_peer < 1.25  # the same amount of quantization noise
    assert (mine - peer).abs().mean() < 1.5 * err_peer


@pytest.mark.slow
def test_peers_on_smollm2_perplexity():
    """smollm2-135m, 2 windows of 256 tokens of stdlib code (calibration: 2 further windows)."""
    import importlib

    from quantsink.config import RunConfig
    from quantsink.measure.passes import run_pass

    quanto = pytest.importorskip("optimum.quanto", reason=MISSING_PEERS)
    _torchao()
    R = importlib.import_module("quantsink.pipeline.run")
    prep = R.prepare(RunConfig(corpus="python-code", max_tokens=512, window=256, calib_windows=2,
                                protocol="windows"), R.Session())  # the windows the tolerances were set on
    model, windows = prep.loaded.model, prep.windows

    def ppl(candidate):
        return run_pass(candidate, windows).summary()["ppl"]

    ref = ppl(model)
    pairs = {
        "w4a16": (ppl(ours(model, "w4a16:group=64")), ppl(torchao_int4(model, 64)), 1e-4),
        "w8a8-tok": (ppl(ours(model, "w8a8-tok")), ppl(torchao_w8a8(model)), 0.05),
    }
    peer = copy.deepcopy(model)
    quanto.quantize(peer, weights=quanto.qint8, activations=quanto.qint8, exclude="lm_head")
    calib = prep.mitigations.calibration()
    with torch.inference_mode(), quanto.Calibration():
        peer(input_ids=calib.input_ids, attention_mask=calib.attention_mask, use_cache=False)
    quanto.freeze(peer)
    # static per-tensor w8a8 on smollm2 is chaotic under float noise (issue 10: a window's NLL moves by up
    # to 40 nats between attention kernels): 31.25 vs 32.32 at 2 threads in one session, 32.03 vs 34.05 in
    # another (6%), so this pair gets 10%
    pairs["w8a8"] = (ppl(ours(model, "w8a8", calibration=prep.mitigations.calibration)), ppl(peer), 0.10)
    print({"reference": ref, **pairs}, flush=True)
    for name, (mine, theirs, tol) in pairs.items():
        assert abs(mine - theirs) / theirs < tol, (name, mine, theirs)


def _mx():
    _torchao()
    return pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason=MISSING_PEERS)


def wide_range(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Rows and columns scaled over many binades (a massive-activation-like spread), one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(3 * torch.randn(rows, 1, generator=g))
    x = x * torch.exp(torch.randn(1, cols, generator=g))
    x[3, :32] = 0
    return x


@pytest.mark.parametrize("rounding", ["floor", "ceil"])
def test_mxfp4_bit_identical_to_torchao(rounding):
    from quantsink.schemes.formats import fake_mxfp4

    mx = _mx()
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    mode = {"floor": ScaleCalculationMode.FLOOR, "ceil": ScaleCalculationMode.RCEIL}[rounding]
    x = wide_range()
    theirs = mx.MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=mode).dequantize(torch.float32)
    assert torch.equal(fake_mxfp4(x, 32, rounding), theirs)


def test_nvfp4_matches_torchao_except_its_block_scale_clamp():
    from quantsink.schemes import formats as F

    _mx()
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor", reason=MISSING_PEERS)

    def theirs(x):
        scale = nv.per_tensor_amax_to_scale(x.abs().max())
        return nv.NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=scale).dequantize(torch.float32)

    moderate = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    assert torch.equal(F.fake_nvfp4(moderate), theirs(moderate))
    x = wide_range()
    ours_x, theirs_x = F.fake_nvfp4(x), theirs(x)
    block_amax = F.blocked(x, "row", 16)[0].abs().amax(-1)  # (64, 16)
    clamped = block_amax / F.E2M1_MAX / F.nv_tensor_scale(x.abs().max()) < 2 ** -6
    differs = (ours_x != theirs_x).reshape(64, 16, 16).any(-1)
    assert clamped.any() and differs.any() and not (differs & ~clamped).any()
    assert (ours_x - x).abs().sum() < (theirs_x - x).abs().sum()


def test_fp8_per_row_bit_identical_to_torchao():
    from quantsink.schemes.formats import fake_fp8

    _torchao()
    qp = pytest.importorskip("torchao.quantization.quant_primitives", reason=MISSING_PEERS)
    x = wide_range()
    scale = qp._choose_scale_float8(x, block_size=[1, x.shape[1]], float8_dtype=torch.float8_e4m3fn)
    q = qp._quantize_affine_float8(x, scale, torch.float8_e4m3fn)
    assert torch.equal(fake_fp8(x, "row"), qp._dequantize_affine_float8(q, scale, torch.float32))
