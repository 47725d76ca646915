"""llama.cpp's scheme names on transformers: ggml's block arithmetic bit for bit (against the gguf package's
reference quantizers), llama.cpp's Hadamard rotation and channel order, the twin on a tiny Llama."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from quantsink.errors import UsageError
from quantsink.schemes import QuantContext, parse_scheme
from quantsink.schemes import quantize as apply_and_calibrate
from quantsink.schemes.gguf import GgmlKVQuantizer, ggml_block_quant, gguf_order, hadamard, rotation_size


@pytest.mark.parametrize("fmt", ["q8_0", "q5_0", "q4_0"])
def test_block_quant_is_ggml_bit_for_bit(fmt):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * rng.exponential(1, (64, 1))).astype(np.float32)
    x[3, 5], x[7, 40], x[9, :32] = 145.0, -300.0, 0.0  # an outlier of each sign, an all-zero block
    qtype = getattr(GGMLQuantizationType, fmt.upper())
    ref = quants.dequantize(quants.quantize(x, qtype), qtype)
    assert np.array_equal(ggml_block_quant(torch.from_numpy(x), fmt).numpy(), ref)


def test_hadamard_is_orthonormal_and_its_own_inverse():
    h = hadamard(128)
    assert torch.allclose(h @ h, torch.eye(128), atol=1e-5) and torch.equal(h, h.T)
    assert float(h[0, 0]) == pytest.approx(128 ** -0.5)


def test_rotation_sizes_follow_llama_cpp():
    assert [rotation_size(d, "key") for d in (64, 128, 192, 256, 48)] == [64, 128, 64, 256, None]
    assert [rotation_size(d, "value") for d in (64, 256, 48)] == [64, 64, None]


def test_gguf_order_interleaves_the_halves_and_round_trips():
    order = gguf_order(8)
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    x = torch.randn(2, 3, 64)
    q = GgmlKVQuantizer("q8_0", None, _NoKeep(), gguf_order(32))
    assert GgmlKVQuantizer._permute(GgmlKVQuantizer._permute(x, order), torch.argsort(order)).equal(x)
    assert q(x).shape == x.shape


class _NoKeep:
    def rows(self, x):
        return None


def test_rotation_spreads_a_constant_outlier_channel_into_every_block():
    """One channel ~145 on every token (Qwen2.5-Coder's layer-0 keys): unrotated, only its own block of 32 has
    a coarse scale; the Hadamard rotation spreads it into all 64 coordinates, so every channel's error grows
    (the finding: kv-q4_0 rot=on is worse than off on Qwen)."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 64)
    x[..., 3] = 145.0
    off = GgmlKVQuantizer("q4_0", None, _NoKeep())(x)
    on = GgmlKVQuantizer("q4_0", 64, _NoKeep())(x)
    small = [c for c in range(64) if c != 3]
    assert (on - x)[..., small].abs().mean() > 1.2 * (off - x)[..., small].abs().mean()
    assert (off - x)[..., 32:].abs().mean() < 0.2 * (on - x)[..., 32:].abs().mean()  # the other block, untouched


def test_names_parse_with_rot_on_off_and_weights_refuse_transformers(tiny_llama):
    assert parse_scheme("kv-q4_0:rot=off").rot is False and parse_scheme("kv-q4_0").rot is True
    assert parse_scheme("kv-q4_0:rot=off").spec() == "kv-q4_0:rot=False"
    with pytest.raises(UsageError, match="--engine llama.cpp"):
        parse_scheme("q4_k_m").check_model(tiny_llama)


def test_twin_quantizes_keys_values_queries_and_rot_changes_it(tiny_llama):
    ids = torch.randint(4, 200, (2, 40))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        outs = {}
        for spec in ("kv-q4_0", "kv-q4_0:rot=off", "kv-q8_0"):
            ctx = QuantContext()
            model = apply_and_calibrate(parse_scheme(spec), copy.deepcopy(tiny_llama), ctx)
            from quantsink.hooks.sites import attach

            with attach(model, ctx.hooks):
                outs[spec] = model(ids).logits
            assert ctx.notes["kv_sites"] == 3 * 2  # keys, values, queries per layer
    err = {s: float((o - ref).abs().mean()) for s, o in outs.items()}
    assert 0 < err["kv-q8_0"] < err["kv-q4_0"] and err["kv-q4_0"] != err["kv-q4_0:rot=off"]


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()
