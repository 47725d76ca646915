"""Simulated schemes: presets, spec round-trips, wrappers on a tiny Llama, keep-fp positions, calibration."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from quantsink.data.windows import Windows
from quantsink.errors import UsageError
from quantsink.hooks.sites import attach, attached_hooks
from quantsink.schemes import SCHEMES, QuantContext, parse_scheme
from quantsink.schemes import quantize as apply_and_calibrate
from quantsink.schemes.simulated import ActQuantizer, KVQuantizer, QuantLinear, Simulated, quantizers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PRESETS = ["w8a8", "w8a8-dyn", "w8a8-tok", "w4a16", "w4a8", "kv8", "kv4", "w8a8-kv8"]
VOCAB = 128
PEAK = 5  # the planted massive-activation channel


@pytest.fixture(scope="module")
def tiny_llama():
    from tiny import tiny_llama as build

    model = build(VOCAB)
    with torch.no_grad():  # plant an extreme token: id 3 lives in channel 5, which norms amplify x30
        embed = model.model.embed_tokens.weight  # (V, C)
        embed[:, PEAK] = 0
        embed[3] = 0
        embed[3, PEAK] = 1
        for layer in model.model.layers:
            layer.input_layernorm.weight[PEAK] = 30
            layer.post_attention_layernorm.weight[PEAK] = 30
    return model


def windows_of(ids: torch.Tensor) -> Windows:
    ones = torch.ones_like(ids)
    return Windows(ids, ones, ones.bool(), ones.sum(1))


def ids_with_sink(n: int = 2, t: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, t), generator=g)  # (B, T)
    ids[:, 0] = 3  # the extreme token sits at position 0
    return ids


def quantize(model, spec: str, **ctx_fields):
    ctx = QuantContext(calibration=lambda: windows_of(ids_with_sink(4, 24, seed=99)), **ctx_fields)
    return apply_and_calibrate(parse_scheme(spec), copy.deepcopy(model), ctx), ctx


def logits(model, ids: torch.Tensor, ctx: QuantContext | None = None) -> torch.Tensor:
    """One forward, with the scheme's hooks (``ctx.hooks``: the keep mask) attached."""
    before = attached_hooks(model)
    with attach(model, ctx.hooks if ctx else {}), torch.inference_mode():
        out = model(input_ids=ids, use_cache=False).logits
    assert attached_hooks(model) == before
    return out


def test_presets_registered_simulated_and_round_trip():
    for name in PRESETS:
        scheme = parse_scheme(name)
        assert isinstance(scheme, Simulated) and scheme.simulated
        assert parse_scheme(scheme.spec()) == scheme
        record = scheme.record()
        assert record["simulated"] is True and set(record["params"]) >= {"w_bits", "act_bits", "kv_bits"}
        assert record["bits"] == scheme.bits
    assert parse_scheme("w4a16").bits == 4.0 and parse_scheme("kv8").bits == 32.0


@pytest.mark.parametrize("text,expected", [
    ("w8a8:act_bits=6,act_gran=token", dict(act_bits=6, act_gran="token", act_mode="dynamic", w_bits=8)),
    ("kv4:group=64", dict(kv_group=64, kv_bits=4)),
    ("w4a16:group=32", dict(w_group=32, w_bits=4)),
    ("w8a8-dyn:w_bits=none", dict(w_bits=None, act_bits=8)),
    ("kv8:k_gran=channel,kv_sym=true", dict(k_gran="channel", kv_sym=True)),
])
def test_overrides_through_spec_strings(text, expected):
    scheme = parse_scheme(text)
    for key, value in expected.items():
        assert getattr(scheme, key) == value
    assert parse_scheme(scheme.spec()) == scheme  # the recorded spec rebuilds the same config


@pytest.mark.parametrize("text", ["w8a8:act_bits=9", "w8a8:act_bits=1", "kv4:kv_group=0", "w8a8:act_gran=row",
                                  "w8a8:bogus=1", "w4a16:w_bits=none", "kv4:kv_bits=none"])
def test_bad_overrides_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_scheme(text)


def test_group_alias_follows_the_preset():
    """``group`` names the preset's own grouped part, whatever else the spec adds."""
    scheme = parse_scheme("w4a16:kv_bits=8,group=64")
    assert scheme.w_group == 64 and scheme.kv_group is None
    assert parse_scheme("kv8:w_bits=4,w_gran=group,group=32").kv_group == 32


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_on_tiny_model(tiny_llama, name):
    model, ctx = quantize(tiny_llama, name)
    ids = ids_with_sink()
    out, ref = logits(model, ids), logits(tiny_llama, ids)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # something was quantized
    scheme = parse_scheme(name)
    n_linear = 7 * 2  # q k v o gate up down per layer; lm_head left alone
    assert ctx.notes["quantized_modules"] == (n_linear if scheme.w_bits or scheme.act_bits else 0)
    assert ctx.notes["kv_sites"] == (4 if scheme.kv_bits else 0)
    assert not isinstance(model.lm_head, QuantLinear)
    assert len(quantizers(model, ActQuantizer)) == (n_linear if scheme.act_bits else 0)
    if scheme.act_mode == "static" and scheme.act_bits:
        assert len(ctx.notes["calibration"]["ids_sha256"]) == 16


def test_weights_are_fake_quantized_on_the_grid(tiny_llama):
    model, _ = quantize(tiny_llama, "w4a16")
    w = model.model.layers[0].mlp.down_proj.weight  # (out, in), in = 128: one group per row
    for row in w[:4]:
        assert len(torch.unique(row)) <= 16
    model, _ = quantize(tiny_llama, "w8a8-dyn:act_bits=none")
    w = model.model.layers[0].self_attn.q_proj.weight
    ref = tiny_llama.model.layers[0].self_attn.q_proj.weight
    step = ref.abs().amax(1, keepdim=True) / 127
    assert ((w - ref).abs() <= step / 2 + 1e-7).all()


def test_quantized_activations_visible_at_input_quantizer(tiny_llama):
    model, _ = quantize(tiny_llama, "w8a8-dyn:act_bits=4")
    seen = {}
    site = model.model.layers[1].mlp.down_proj.input_quantizer
    handle = site.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    try:
        logits(model, ids_with_sink())
    finally:
        handle.remove()
    assert seen["y"].shape == seen["x"].shape
    assert len(torch.unique(seen["y"][0])) <= 15  # one int4 grid per sequence


def test_sink_position_kept_bit_identical(tiny_llama):
    """With position 0 kept, its logits equal the weight-only model's (causal: position 0 sees only itself)."""
    ids = ids_with_sink()
    for spec, float_acts in [("w8a8-dyn", "w8a8-dyn:act_bits=none"), ("w8a8", "w8a8-dyn:act_bits=none"),
                             ("w8a8-tok:act_bits=4", "w8a8-dyn:act_bits=none"), ("kv4", None),
                             ("w8a8-kv8", "w8a8-dyn:act_bits=none")]:
        kept, ctx = quantize(tiny_llama, spec, keep_fp_positions=(0,))
        target = tiny_llama if float_acts is None else quantize(tiny_llama, float_acts)[0]
        assert torch.equal(logits(kept, ids, ctx)[:, 0], logits(target, ids)[:, 0]), spec
        assert not torch.equal(logits(kept, ids, ctx)[:, 1:], logits(target, ids)[:, 1:]), spec


def test_keeping_the_sink_helps_per_tensor(tiny_llama):
    ids = ids_with_sink()
    ref = logits(tiny_llama, ids)
    err = {}
    for keep in [(), (0,)]:
        model, ctx = quantize(tiny_llama, "w8a8-dyn:w_bits=none,act_bits=6", keep_fp_positions=keep)
        err[keep] = (logits(model, ids, ctx) - ref)[:, 1:].abs().mean()
    assert err[(0,)] < err[()] / 2


def test_keep_fp_mask_hook_sees_input_ids(tiny_llama):
    """A callable keep_fp (e.g. detected extreme tokens) marks positions by their ids."""
    ids = ids_with_sink()
    ids[0, 5] = 3  # a second extreme token, mid-sequence
    model, ctx = quantize(tiny_llama, "w8a8-dyn:w_bits=none,act_bits=4", keep_fp=lambda x: x == 3)
    assert ctx.notes["keep_fp_hook"] is True
    seen = {}
    site = model.model.layers[0].self_attn.q_proj.input_quantizer
    handle = site.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    try:
        logits(model, ids, ctx)
    finally:
        handle.remove()
    keep = ids == 3
    assert torch.equal(seen["y"][keep], seen["x"][keep])
    assert not torch.equal(seen["y"][~keep], seen["x"][~keep])


def test_static_calibration_excludes_kept_positions(tiny_llama):
    calib = ids_with_sink(4, 24, seed=99)  # what quantize() calibrates on
    seen = []
    site = tiny_llama.model.layers[0].self_attn.q_proj
    handle = site.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        logits(tiny_llama, calib)
    finally:
        handle.remove()
    x = seen[0]  # (B, T, C) float input of layer 0's q_proj
    full, _ = quantize(tiny_llama, "w8a8:w_bits=none")
    kept, ctx = quantize(tiny_llama, "w8a8:w_bits=none", keep_fp_positions=(0,))
    a = full.model.layers[0].self_attn.q_proj.input_quantizer
    b = kept.model.layers[0].self_attn.q_proj.input_quantizer
    assert torch.isclose(a.hi, x.max()) and torch.isclose(b.hi, x[:, 1:].max())
    assert torch.isclose(b.lo, x[:, 1:].min())
    assert b.hi < a.hi / 10  # the planted peak at position 0 no longer sets the range
    assert ctx.notes["calibration"]["windows"] == 4 and ctx.notes["keep_fp_positions"] == [0]


def test_static_ranges_are_the_calibration_extremes():
    keep_state = type("K", (), {"rows": lambda self, x: None, "tokens": lambda self, x: x})()
    q = ActQuantizer(8, True, "static", "tensor", keep_state)
    q.observing = True
    q(torch.tensor([[[-2.0, 1.0]]]))
    q(torch.tensor([[[0.5, 3.0]]]))
    q.observing, q.calibrated = False, True
    assert (q.lo.item(), q.hi.item()) == (-2.0, 3.0)
    y = q(torch.tensor([[[3.0, 100.0]]]))
    assert torch.allclose(y, torch.tensor([[[3.0, 3.0]]]))  # clamped to the calibrated range


def test_static_without_calibration_is_an_error(tiny_llama):
    from quantsink.errors import QuantsinkError

    with pytest.raises(QuantsinkError):
        apply_and_calibrate(parse_scheme("w8a8"), copy.deepcopy(tiny_llama), QuantContext())


def test_kv_quantizer_granularity(tiny_llama):
    model, _ = quantize(tiny_llama, "kv4:k_gran=channel,kv_group=8")
    k = model.model.layers[0].self_attn.k_proj.output_quantizer
    assert isinstance(k, KVQuantizer) and k.gran == "channel" and k.group == 8  # blocks of 8 tokens
    model, _ = quantize(tiny_llama, "kv4:k_gran=channel")
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.output_quantizer.group is None  # per channel over the whole window
    assert attn.v_proj.output_quantizer.group == 16  # per token: one head (head_dim 16) per range
    x = torch.randn(2, 24, 32)
    y = attn.v_proj.output_quantizer(x)
    for head in range(2):
        assert len(torch.unique(y[0, 3, head * 16:(head + 1) * 16])) <= 16


def test_results_do_not_depend_on_batching(tiny_llama):
    model, _ = quantize(tiny_llama, "w8a8-kv8:act_mode=dynamic")
    ids = ids_with_sink(3)
    together = logits(model, ids)
    alone = torch.cat([logits(model, ids[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_list_schemes_shows_every_preset():
    names = [entry.name for entry in SCHEMES]
    for name in PRESETS:
        assert name in names
        assert "kv_bits" in SCHEMES.get(name).record()["params"]


@pytest.fixture(scope="module")
def smollm2_code():
    """smollm2-135m and 2 windows of 256 tokens of stdlib code; 2 calibration windows after them."""
    import importlib

    from quantsink.config import RunConfig

    R = importlib.import_module("quantsink.pipeline.run")
    config = RunConfig(corpus="python-code", max_tokens=512, window=256, calib_windows=2)
    return R, config, R.Session()


@pytest.mark.slow
def test_smollm2_w8a8_record_and_disjoint_calibration(smollm2_code, tmp_path):
    import hashlib

    from quantsink.data.corpus import tokenize

    R, config, session = smollm2_code
    config = config.replace(protocol="windows")  # the joined-stream protocol (documents: tests/data/test_windows.py)
    record = R.run(config.replace(scheme="w8a8", results=str(tmp_path)), session=session)
    scheme, cand, ref = record.scheme, record.candidate, record.reference
    assert scheme.simulated is True and scheme.params["act_mode"] == "static"
    assert ref.ppl < cand.ppl < 10 * ref.ppl and 0 < cand.kl and 0 < cand.top1_agreement < 1
    # calibration windows are the stream tokens right after the evaluation tokens, and hashed into the record
    prep = R.prepare(config, session)
    calib, used = prep.mitigations.calibration(), prep.protocol["tokens"]
    stream = tokenize(prep.corpus, prep.loaded.tokenizer, limit=used + 2 * 256)
    assert prep.windows.input_ids.flatten().tolist() == stream.ids[:used]
    assert calib.input_ids.flatten().tolist() == stream.ids[used:used + 512]
    applied = scheme.applied["calibration"]
    assert applied["windows"] == 2
    assert applied["ids_sha256"] == hashlib.sha256(calib.input_ids.numpy().tobytes()).hexdigest()[:16]


@pytest.mark.slow
def test_smollm2_sink_dominates_per_tensor_activations(smollm2_code):
    """FACTS.md: dynamic per-tensor int8 activations hurt; keeping token 0 in float recovers most of it;
    per-token activations and kv8 stay close to the reference."""
    from quantsink.measure.passes import run_pass

    R, config, session = smollm2_code
    prep = R.prepare(config, session)
    model = prep.loaded.model

    def ppl(spec: str, keep: tuple[int, ...] = ()) -> float:
        ctx = QuantContext(calibration=prep.mitigations.calibration, keep_fp_positions=keep)
        candidate = apply_and_calibrate(parse_scheme(spec), copy.deepcopy(model), ctx)
        with attach(candidate, ctx.hooks):
            return run_pass(candidate, prep.windows).summary()["ppl"]

    ref = run_pass(model, prep.windows).summary()["ppl"]
    dyn, kept = ppl("w8a8-dyn:w_bits=none"), ppl("w8a8-dyn:w_bits=none", keep=(0,))
    assert dyn > 1.5 * ref and kept < ref + 0.5 * (dyn - ref)
    assert ppl("w8a8-tok") < 1.1 * ref
    assert ppl("kv8") < 1.01 * ref


def test_linears_reading_one_tensor_quantize_it_once(tiny_llama, monkeypatch):
    """q/k/v_proj (and gate/up_proj) read one tensor: quantized once per settings, same values."""
    from quantsink.schemes import simulated

    calls = []
    real = simulated.fake_quant
    monkeypatch.setattr(simulated, "fake_quant", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    model, _ = quantize(tiny_llama, "w8a8-dyn")
    outs = {}
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    handles = [m.input_quantizer.register_forward_hook(lambda m, a, o, n=n: outs.update({n: (a[0], o)}))
               for n, m in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("up", mlp.up_proj))]
    calls.clear()  # weights were quantized when the scheme was applied
    try:
        logits(model, ids_with_sink())
    finally:
        for handle in handles:
            handle.remove()
    same = [outs[n][1].data_ptr() for n in "qkv"]
    assert outs["q"][0] is outs["k"][0] and same == [same[0]] * 3  # one quantized tensor for q, k and v
    assert torch.equal(outs["q"][1], real(outs["q"][0], 8, gran="tensor"))
    assert len(calls) == 2 * 4  # per layer: q/k/v once, o, gate/up once, down
    lone = ActQuantizer(8, True, "dynamic", "tensor", type("K", (), {"rows": lambda self, x: None, "tokens": lambda self, x: x})())
    x = outs["up"][0]
    assert torch.equal(lone(x), outs["up"][1])  # a quantizer with its own memo: the same values


def test_static_scale_follows_a_changed_range():
    keep_state = type("K", (), {"rows": lambda self, x: None, "tokens": lambda self, x: x})()
    q = ActQuantizer(8, True, "static", "tensor", keep_state)
    q.lo, q.hi, q.calibrated = torch.tensor(-1.0), torch.tensor(1.0), True
    x = torch.tensor([[[0.5, 2.0]]])
    assert q(x)[0, 0, 1] == 1.0  # clamped to the range
    q.lo, q.hi = torch.tensor(-4.0), torch.tensor(4.0)  # a new range (e.g. re-calibrated)
    assert torch.isclose(q(x.clone())[0, 0, 1], torch.tensor(2.0), atol=4 / 127)


def test_calibration_skips_the_output_head(tiny_llama, monkeypatch):
    """The calibration forward computes the last position's logits only; the ranges are unchanged."""
    from quantsink.schemes import simulated

    assert simulated.skip_logits(tiny_llama) == {"logits_to_keep": 1}
    shapes = []
    real = simulated.calibrate

    def spy(model, ctx):
        handle = model.lm_head.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
        try:
            return real(model, ctx)
        finally:
            handle.remove()

    monkeypatch.setattr(simulated, "calibrate", spy)
    skipped, _ = quantize(tiny_llama, "w8a8")
    monkeypatch.setattr(simulated, "skip_logits", lambda model: {})
    full, _ = quantize(tiny_llama, "w8a8")
    assert shapes == [(4, 1, VOCAB), (4, 24, VOCAB)]  # the head ran on one position per window, then on all
    ranges = [[(float(q.lo), float(q.hi)) for q in quantizers(m, ActQuantizer).values()] for m in (skipped, full)]
    assert ranges[0] == ranges[1]
