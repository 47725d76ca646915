"""Float formats (FP8 E4M3, E2M1, MXFP4, NVFP4): exact grids, scale rounding, saturation, zeros, NaN;
the float-format presets on a tiny Llama; keys quantized after RoPE (and after gemma3's k_norm)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from quantsink.schemes import formats as F
from quantsink.data.windows import Windows
from quantsink.errors import UsageError
from quantsink.hooks.sites import attach
from quantsink.schemes import SCHEMES, QuantContext, parse_scheme
from quantsink.schemes import quantize as apply_and_calibrate
from quantsink.schemes.fp_formats import FloatFormats, FormatQuantizer

PRESETS = ["w8a8-fp8", "kv-fp8", "mxfp4", "w4a4-mxfp4", "nvfp4", "w4a4-nvfp4"]
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
VOCAB = 128


def e4m3_values() -> torch.Tensor:
    """Every finite E4M3 value, from the 256 bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)]


# --------------------------------------------------------------------------- FP8 E4M3


def test_e4m3_grid_is_exact_and_saturates():
    grid = e4m3_values()
    assert torch.equal(F.round_e4m3(grid), grid)
    assert grid.max() == 448 and grid[grid > 0].min() == 2 ** -9  # largest finite, smallest subnormal
    big = torch.tensor([449.0, 1e6, float("inf"), -1e6, float("-inf")])
    assert F.round_e4m3(big).tolist() == [448, 448, 448, -448, -448]
    assert math.isnan(F.round_e4m3(torch.tensor([float("nan")])).item())
    assert str(F.round_e4m3(torch.tensor([-0.0])).item()) == "-0.0"


def test_e4m3_rounds_to_nearest_ties_to_even():
    # [1, 2): spacing 1/8; 1.0625 lies halfway between 1.0 (mantissa 000) and 1.125 (001)
    cases = {1.0625: 1.0, 1.1875: 1.25, 1.07: 1.125, 2 ** -10: 0.0, 3 * 2 ** -11: 2 ** -9, 240.0: 240.0,
             232.0: 224.0, 464.0: 448.0}  # 232: halfway 224 (mantissa 110) / 240 (111) -> 224
    for value, expected in cases.items():
        assert F.round_e4m3(torch.tensor([value])).item() == expected, value


def test_fp8_scales_per_row_put_each_row_max_on_448():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 40) * torch.tensor([1.0, 1e3, 1e-3, 7, 1, 0.1])[:, None]  # (B, T, C)
    x[0, 4] = 0  # an all-zero row: exact zeros, no NaN
    y = F.fake_fp8(x, "row")
    scale = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(y[0, 4], torch.zeros(40))
    rows = scale.squeeze(-1) > 0
    units = y[rows] / scale[rows]  # E4M3 values, up to one float32 rounding
    assert torch.allclose(units, F.round_e4m3(units), rtol=1e-6, atol=0)
    assert torch.allclose(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)
    rel = ((y - x).abs()[rows] / scale[rows]).max()
    assert rel <= 16.0  # half a step at the top binade (spacing 32 below 448)


def test_fp8_per_tensor_and_static_share_one_scale():
    x = torch.tensor([[[1.0, -3.0], [0.01, 300.0]]])  # (1, 2, 2)
    y = F.fake_fp8(x, "tensor")
    assert y[0, 1, 1] == 300.0 and y[0, 1, 0] != 0.01  # the small value rounds on the shared grid
    static = F.fake_fp8(x, amax=torch.tensor(100.0))  # a calibrated range saturates larger values
    assert static[0, 1, 1] == 100.0 and static[0, 0, 1] == F.fake_fp8(x, amax=torch.tensor(100.0))[0, 0, 1]


def test_fp8_keep_rows_stay_exact_and_out_of_the_range():
    x = torch.randn(1, 5, 16)
    x[0, 0, 3] = 1e4  # a massive activation on the sink row
    keep = torch.tensor([[True, False, False, False, False]])
    y = F.fake_fp8(x, "tensor", keep=keep)
    assert torch.equal(y[0, 0], x[0, 0])
    assert torch.equal(y[:, 1:], F.fake_fp8(x[:, 1:], "tensor"))


def test_fp8_nan_poisons_only_its_group():
    x = torch.ones(1, 3, 8)
    x[0, 1, 2] = float("nan")
    y = F.fake_fp8(x, "row")
    assert torch.isnan(y[0, 1]).all() and torch.equal(y[0, [0, 2]], torch.ones(2, 8))


# --------------------------------------------------------------------------- E2M1, MXFP4


def test_e2m1_grid_ties_saturation_zero_nan():
    grid = torch.tensor(E2M1 + [-v for v in E2M1])
    assert torch.equal(F.round_e2m1(grid), grid)
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}  # to the even code
    for value, expected in ties.items():
        assert F.round_e2m1(torch.tensor([value, -value])).tolist() == [expected, -expected]
    assert F.round_e2m1(torch.tensor([6.9, 1e9, float("inf")])).tolist() == [6.0, 6.0, 6.0]
    assert str(F.round_e2m1(torch.tensor([-0.1])).item()) == "-0.0"
    assert math.isnan(F.round_e2m1(torch.tensor([float("nan")])).item())


def test_mx_shared_scale_rounds_down_as_ocp():
    amax = torch.tensor([6.0, 7.99, 8.0, 4.0, 3.99, 1.0, 0.0, 2.0 ** -140, 2.0 ** 100])
    expected = [1.0, 1.0, 2.0, 1.0, 0.5, 0.25, 2.0 ** -127, 2.0 ** -127, 2.0 ** 98]  # E8M0 floor: 2^-127
    assert F.mx_scale(amax).tolist() == expected
    # ceil: the smallest power of two with amax / X <= 6 (nothing saturates)
    assert F.mx_scale(torch.tensor([6.0, 7.99, 12.0, 12.01, 3.0]), "ceil").tolist() == [1.0, 2.0, 2.0, 4.0, 0.5]
    assert math.isnan(F.mx_scale(torch.tensor([float("nan")])).item())
    assert math.isnan(F.mx_scale(torch.tensor([float("inf")])).item())


def test_mxfp4_block_by_hand():
    """amax 12 -> X = 2^(floor(log2 12) - 2) = 2; 12/2 = 6 -> 6, 5/2 = 2.5 -> 2 (tie to even),
    -1.7/2 = -0.85 -> -1, 0.3/2 = 0.15 -> 0; 15.9 in the second block: X = 2, 7.95 saturates to 6."""
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([12.0, 5.0, -1.7, 0.3])
    x[0, 32:34] = torch.tensor([15.9, 1.0])
    y = F.fake_mxfp4(x)
    assert y[0, :4].tolist() == [12.0, 4.0, -2.0, 0.0]
    assert y[0, 32:34].tolist() == [12.0, 1.0]  # the OCP floor rule clips the block max (15.9 -> 12)
    assert F.fake_mxfp4(x, rounding="ceil")[0, 32:34].tolist() == [16.0, 0.0]  # X = 4: 15.9/4 -> 4, 1/4 -> 0
    assert torch.equal(y[0, 4:32], torch.zeros(28))


def test_mxfp4_zero_and_nan_blocks_and_padding():
    x = torch.randn(2, 70)  # 70 = 2 blocks of 32 + a zero-padded block of 6
    x[0, :32] = 0
    x[1, 40] = float("nan")
    y = F.fake_mxfp4(x)
    assert torch.equal(y[0, :32], torch.zeros(32))
    assert torch.isnan(y[1, 32:64]).all() and not torch.isnan(y[1, :32]).any() and not torch.isnan(y[1, 64:]).any()
    scales = F.mx_scale(F.blocked(x[1:, :32], "row", 32)[0].abs().amax(-1, keepdim=True))
    assert torch.isin(y[1, :32] / scales.flatten(), torch.tensor(E2M1 + [-v for v in E2M1])).all()


# --------------------------------------------------------------------------- NVFP4


def test_nvfp4_two_level_scales_by_hand():
    """s_t = 2688 / (448 * 6) = 1.  Block A: s_b = e4m3(2688 / 6) = 448; 1000/448 = 2.23 -> 2 -> 896.
    Block B: s_b = e4m3(1/6) = 0.171875 (0.1667 lies nearer 0.171875 than 0.15625);
    1/0.171875 = 5.82 -> 6 -> 1.03125, 0.3/0.171875 = 1.745 -> 1.5 -> 0.2578125.
    Block C: s_b = e4m3(1e-6 / 6) = 0: the block dequantizes to 0."""
    x = torch.zeros(1, 48)
    x[0, :2] = torch.tensor([2688.0, 1000.0])
    x[0, 16:18] = torch.tensor([1.0, 0.3])
    x[0, 32] = 1e-6
    y = F.fake_nvfp4(x)
    assert y[0, :2].tolist() == [2688.0, 896.0]
    assert y[0, 16:18].tolist() == [1.03125, 0.2578125]
    assert y[0, 32] == 0


def test_nvfp4_global_scale_static_per_token_zero_and_keep():
    x = torch.randn(2, 4, 32)
    assert torch.equal(F.fake_nvfp4(torch.zeros(1, 2, 16)), torch.zeros(1, 2, 16))
    # one FP32 scale per sequence: scaling one sequence leaves the other alone
    y = F.fake_nvfp4(x)
    x2 = x.clone()
    x2[1] *= 1000
    assert torch.equal(F.fake_nvfp4(x2)[0], y[0])
    # a kept (full-precision) row stays exact and out of the tensor amax
    x3 = x.clone()
    x3[:, 0, 0] = 1e5
    keep = torch.zeros(2, 4, dtype=torch.bool)
    keep[:, 0] = True
    kept = F.fake_nvfp4(x3, keep=keep)
    assert torch.equal(kept[:, 0], x3[:, 0])
    masked = x3.masked_fill(keep[..., None], 0)
    assert torch.equal(kept[:, 1:], F.fake_nvfp4(masked)[:, 1:])
    # the static amax replaces the data's
    assert torch.equal(F.fake_nvfp4(x, amax=x.abs().amax()), F.fake_nvfp4(x.reshape(1, 8, 32)).reshape(2, 4, 32))


# --------------------------------------------------------------------------- schemes


def test_presets_registered_simulated_and_round_trip():
    for name in PRESETS:
        scheme = parse_scheme(name)
        assert isinstance(scheme, FloatFormats) and scheme.simulated
        assert parse_scheme(scheme.spec()) == scheme
        record = scheme.record()
        assert record["simulated"] is True and {"w_fmt", "act_fmt", "kv_fmt", "kv_keys"} <= set(record["params"])
        assert name in [entry.name for entry in SCHEMES]
    assert parse_scheme("mxfp4").bits == 4.0 and parse_scheme("w8a8-fp8").bits == 8.0
    assert parse_scheme("w4a4-nvfp4").act_mode == "static"
    assert parse_scheme("kv8:key_gran=channel").k_gran == "channel"
    assert parse_scheme("mxfp4:group=16").block == 16 and parse_scheme("w4a4-nvfp4:group=32").block == 32
    assert parse_scheme("kv-fp8:key_gran=tensor,v_gran=tensor").needs_calibration()


@pytest.mark.parametrize("text", ["w8a8-fp8:w_bits=4", "w4a4-mxfp4:act_mode=static,act_gran=tensor", "kv8:k_gran=tensor",
                                  "kv-fp8:kv_fmt=int,k_gran=tensor", "mxfp4:block=0", "kv8:kv_keys=mid-rope",
                                  "w4a4-nvfp4:act_fmt=fp4"])
def test_bad_specs_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_scheme(text)


@pytest.fixture(scope="module")
def tiny_llama():
    from tiny import tiny_llama as build

    return build(VOCAB)


def calibration() -> Windows:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    ones = torch.ones_like(ids)
    return Windows(ids, ones, ones.bool(), ones.sum(1))


def quantize(model, spec: str, **ctx_fields):
    ctx = QuantContext(calibration=calibration, **ctx_fields)
    return apply_and_calibrate(parse_scheme(spec), copy.deepcopy(model), ctx), ctx


def test_weights_are_on_the_format_grid_once_applied(tiny_llama):
    model, ctx = quantize(tiny_llama, "mxfp4")
    w0 = tiny_llama.model.layers[0].mlp.down_proj.weight  # (64, 128)
    w = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, F.fake_mxfp4(w0)) and ctx.notes["quantized_modules"] == 14
    scales = F.mx_scale(F.blocked(w0, "row", 32)[0].abs().amax(-1, keepdim=True))
    assert torch.isin(F.blocked(w, "row", 32)[0] / scales, torch.tensor(E2M1 + [-v for v in E2M1])).all()
    model, _ = quantize(tiny_llama, "w8a8-fp8")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, F.fake_fp8(w0, "row"))
    model, _ = quantize(tiny_llama, "nvfp4")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, F.fake_nvfp4(w0))


def test_activation_quantizers_follow_the_spec(tiny_llama):
    seen = {}
    x = torch.randn(2, 5, 128)
    for spec in ("w8a8-fp8", "w8a8-fp8:act_gran=tensor", "w4a4-mxfp4", "w4a4-nvfp4:act_mode=dynamic"):
        model, _ = quantize(tiny_llama, spec)
        q = model.model.layers[1].mlp.down_proj.input_quantizer
        assert isinstance(q, FormatQuantizer)
        seen[spec] = q(x)
    assert torch.equal(seen["w8a8-fp8"], F.fake_fp8(x, "row"))
    assert torch.equal(seen["w8a8-fp8:act_gran=tensor"], F.fake_fp8(x, "tensor"))
    assert torch.equal(seen["w4a4-mxfp4"], F.fake_mxfp4(x))
    assert torch.equal(seen["w4a4-nvfp4:act_mode=dynamic"], F.fake_nvfp4(x))


def test_static_scales_come_from_calibration(tiny_llama):
    model, ctx = quantize(tiny_llama, "w4a4-nvfp4")
    q = model.model.layers[0].self_attn.q_proj.input_quantizer
    assert q.calibrated and q.hi > 0 and ctx.notes["calibration"]["windows"] == 2
    x = torch.randn(1, 3, 64)
    assert torch.equal(q(x), F.fake_nvfp4(x, amax=torch.maximum(-q.lo, q.hi)))
    model, ctx = quantize(tiny_llama, "kv-fp8:k_gran=tensor,v_gran=tensor")
    k = model.model.layers[0].self_attn.k_proj.output_quantizer
    assert k.mode == "static" and k.calibrated and "calibration" in ctx.notes
    assert "per tensor, static" in ctx.notes["parts"]["kv"]


def test_sink_fp_positions_pass_the_float_formats(tiny_llama):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    for spec in ("w8a8-fp8:w_bits=none,act_gran=tensor", "w4a4-nvfp4:w_bits=none"):
        model, ctx = quantize(tiny_llama, spec, keep_fp_positions=(0,))
        captured = []
        q = model.model.layers[0].self_attn.q_proj
        handle = q.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
        with attach(model, ctx.hooks), torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        handle.remove()
        x, out = captured[0]
        assert torch.allclose(out[:, 0], torch.nn.functional.linear(x[:, 0], q.weight), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=256, sliding_window=8)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_norm.weight.normal_()  # a non-trivial k_norm
    return model


def post_rope_keys(model, ids, ctx=None) -> list[torch.Tensor]:
    """The keys every attention layer receives after RoPE, taken from the model's own
    ``apply_rotary_pos_emb`` (an independent route to the same tensor)."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    original, seen = module.apply_rotary_pos_emb, []

    def spy(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = original(q, k, cos, sin, *args, **kwargs)
        seen.append(k_embed.detach().clone())
        return q_embed, k_embed

    module.apply_rotary_pos_emb = spy
    try:
        with attach(model, ctx.hooks if ctx else {}), torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        module.apply_rotary_pos_emb = original
    return seen  # each (B, H, T, D)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("spec", ["kv8:kv_keys=post-rope", "kv-fp8:kv_keys=post-rope",
                                  "kv4:kv_keys=post-rope,key_gran=channel"])
def test_post_rope_keys_are_the_quantized_rotated_keys(family, spec, request):
    reference = request.getfixturevalue(family)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    model, ctx = quantize(reference, spec)
    float_keys = post_rope_keys(reference, ids)
    quant_keys = post_rope_keys(model, ids, ctx)
    inner = model.model.layers[0].self_attn.key_quantizer.quantizer
    flat = float_keys[0].transpose(1, 2).flatten(-2)  # (B, T, H*D), the quantizer's layout
    expected = inner(flat).unflatten(-1, (-1, quant_keys[0].shape[-1])).transpose(1, 2)
    assert not torch.allclose(quant_keys[0], float_keys[0], atol=1e-4)
    assert torch.allclose(quant_keys[0], expected, atol=1e-5, rtol=1e-5)
    has_norm = family == "tiny_gemma3"
    assert ctx.notes["keys"] == ("post-rope; after k_norm" if has_norm else "post-rope; the model has no k_norm")
    assert "after any k_norm and the rotary embedding" in ctx.notes["parts"]["kv"]


def test_pre_rope_keys_on_gemma3_are_quantized_before_k_norm(tiny_gemma3):
    model, ctx = quantize(tiny_gemma3, "kv8")
    assert ctx.notes["keys"] == "pre-rope; before k_norm"
    assert "before any k_norm" in ctx.notes["parts"]["kv"]
    assert not hasattr(model.model.layers[0].self_attn, "key_quantizer")


def test_post_rope_refuses_a_partial_rotary_embedding(tiny_llama):
    from quantsink.errors import QuantsinkError

    model, _ = quantize(tiny_llama, "kv8:kv_keys=post-rope")
    keys = model.model.layers[0].self_attn.key_quantizer
    keys.frame.cos, keys.frame.sin = torch.ones(1, 4, 8), torch.zeros(1, 4, 8)  # head_dim is 16
    with pytest.raises(QuantsinkError, match="partial RoPE"):
        keys(torch.randn(1, 4, 32))


# --------------------------------------------------------------------------- end to end on a tiny model


@pytest.mark.parametrize("spec", PRESETS + ["w8a8-fp8:act_mode=static,act_gran=tensor",
                                            "kv-fp8:k_gran=tensor,v_gran=tensor,kv_keys=post-rope"])
def test_presets_end_to_end_on_tiny_model(spec, tiny_model_dir, tiny_text_file, tmp_path):
    import importlib

    from quantsink import RunConfig

    run_config = importlib.import_module("quantsink.pipeline.execute").run_config

    scheme = parse_scheme(spec)
    token_level = bool(scheme.act_bits or scheme.kv_bits)  # weight-only schemes have nothing for sink-fp to keep
    config = RunConfig(model=str(tiny_model_dir), scheme=spec, mitigation="sink-fp" if token_level else "none",
                       corpus=f"file:{tiny_text_file}", window=64, max_tokens=128, calib_windows=1, stats_windows=1,
                       results=str(tmp_path))
    record, effects = run_config(config)
    assert record.scheme.simulated is True and record.scheme.name == spec.split(":")[0]
    assert math.isfinite(record.candidate.ppl) and record.candidate.kl > 0
    assert record.scheme.applied["parts"] == scheme.parts()
    if token_level:
        assert effects.mitigation_effect["verdict"] == "insufficient-data"  # 2 windows
        assert effects.d_sink["sink_fp_run_id"] == record.run_id and effects.missing == ()
