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

``make test`` installs the peers (the ``test`` extra includes ``peers``); on a machine without
them these checks skip with the reason "missing tool: ..." and under ``CI=true`` that skip is a
failure (``tests/conftest.py``).  quantsink itself never needs them.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from quantsink.schemes import QuantContext, default_filter, parse_scheme

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
    return parse_scheme(spec).apply(copy.deepcopy(model), QuantContext(calibration=calibration))


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
    from quantsink.evaluate import run_pass

    quanto = pytest.importorskip("optimum.quanto", reason=MISSING_PEERS)
    _torchao()
    R = importlib.import_module("quantsink.run")
    prep = R.prepare(RunConfig(corpus="python-code", max_tokens=512, window=256, calib_windows=2), R.Session())
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
    calib = prep.calibration()
    with torch.inference_mode(), quanto.Calibration():
        peer(input_ids=calib.input_ids, attention_mask=calib.attention_mask, use_cache=False)
    quanto.freeze(peer)
    # static per-tensor w8a8 on smollm2 is chaotic under float noise (issue 10: a window's NLL moves by up
    # to 40 nats between attention kernels): 31.25 vs 32.32 at 2 threads in one session, 32.03 vs 34.05 in
    # another (6%), so this pair gets 10%
    pairs["w8a8"] = (ppl(ours(model, "w8a8", calibration=prep.calibration)), ppl(peer), 0.10)
    print({"reference": ref, **pairs}, flush=True)
    for name, (mine, theirs, tol) in pairs.items():
        assert abs(mine - theirs) / theirs < tol, (name, mine, theirs)
