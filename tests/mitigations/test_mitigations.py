"""Each mitigation checks what it promises, on a tiny Llama built from a config."""

import copy

import pytest
import torch

from quantsink.data.corpus import TokenStream
from quantsink.data.windows import sliding_windows
from quantsink.errors import UsageError
from quantsink.mitigations import MITIGATIONS, Env, MitigationStack, canonical_mitigation, parse_mitigations
from quantsink.hooks.sites import Hook, attach, attached_hooks, hidden_of, layer_sites
from quantsink.mitigations._layers import cache_kwarg, output_cache
from quantsink.mitigations.clip import clip_norms
from quantsink.mitigations.intact_kv import prefix_length
from quantsink.mitigations.sink_fp import peak_ratio
from quantsink.schemes import QuantContext, parse_scheme

VOCAB = 96


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


class TinyTokenizer:
    bos_token_id, bos_token, unk_token_id, unk_token = 1, "<s>", 0, "<unk>"

    def __len__(self):
        return VOCAB

    def convert_tokens_to_ids(self, token):
        return {"<s>": 1, "</s>": 2, "<unk>": 0}.get(token, 0)

    def convert_ids_to_tokens(self, i):
        return {1: "<s>", 2: "</s>"}.get(i, f"t{i}")


def windows(n=3, t=12, prefix=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n * t,), generator=g).tolist()
    w, _ = sliding_windows(TokenStream(ids, [1] * len(ids)), window=t, stride=t, prefix=prefix, max_tokens=n * t)
    return w


def stack_of(spec, model, scheme="fp32", calib=None):
    return MitigationStack.of(parse_mitigations(spec), reference=model, tokenizer=TinyTokenizer(),
                              scheme=parse_scheme(scheme), calibration=calib or (lambda: windows(seed=9)))


# ---------------------------------------------------------------- parsing, registry


def test_specs_compose_and_canonicalize():
    ms = parse_mitigations("sink-token,sink-fp:k=2,smooth:alpha=0.8")
    assert [m.name for m in ms] == ["sink-token", "sink-fp", "smooth"]
    assert ms[1].k == 2 and ms[2].alpha == 0.8
    assert parse_mitigations("sink-fp:k=detect")[0].k == "detect"
    assert canonical_mitigation("none") == "none" and canonical_mitigation("sink-fp:k=1") == "sink-fp"
    assert canonical_mitigation("clip-residual:max=100") == "clip-residual:max=100.0"
    assert {e.obj.kind for e in MITIGATIONS} <= {"post-hoc", "needs-training"}


@pytest.mark.parametrize("bad", ["sink-fp:k=0", "sink-fp:k=two", "smooth:alpha=2", "clip-residual:tau=-1",
                                 "sink-fpp", "sink-fp,sink-fp", "smooth:beta=1"])
def test_bad_specs_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_mitigations(bad)


@pytest.mark.parametrize("scheme", ["int8", "nf4", "fp32", "bf16"])
def test_sink_fp_refuses_schemes_without_token_quantization(scheme):
    with pytest.raises(UsageError, match="cannot|no such"):
        parse_mitigations("sink-fp")[0].check(parse_scheme(scheme))


# ---------------------------------------------------------------- clip-residual


def test_clip_norms_bounds_the_norm_and_keeps_direction():
    h = torch.randn(2, 10, 16)
    h[:, 0] *= 500  # a residual-state peak at token 0
    out, mask = clip_norms(h, tau=3.0, bound=None)
    med = h.norm(dim=-1).median(dim=-1, keepdim=True).values
    assert (out.norm(dim=-1) <= 3.0 * med * (1 + 1e-5)).all()
    assert mask[:, 0].all() and torch.equal(out[~mask], h[~mask])
    cos = torch.nn.functional.cosine_similarity(out[:, 0], h[:, 0], dim=-1)
    assert torch.allclose(cos, torch.ones(2), atol=1e-5)
    out, mask = clip_norms(h, tau=3.0, bound=2.0)
    assert (out.norm(dim=-1) <= 2.0 + 1e-5).all()


def test_clip_norms_sink_only_touches_position_0():
    h = torch.randn(2, 10, 16)
    h[:, 0] *= 500
    h[:, 5] *= 400  # another extreme token: left alone by the default target
    out, mask = clip_norms(h, tau=3.0, bound=None, sink_only=True)
    assert mask[:, 0].all() and not mask[:, 1:].any() and torch.equal(out[:, 1:], h[:, 1:])
    assert (out[:, 0].norm(dim=-1) < h[:, 0].norm(dim=-1) / 10).all()


def test_clip_residual_targets_the_sink_by_default(tiny):
    ids = windows().input_ids
    free = _layer_norms(tiny, ids)
    bound = float(min(n.max() for n in free)) / 2
    stack = stack_of(f"clip-residual:max={bound}", tiny)
    assert stack.mitigations[0].target == "sink"
    with stack.attach(tiny):
        clipped = _layer_norms(tiny, ids)
    notes = stack.record()[0]["applied"]
    assert all(v["clipped"] == v["clipped_at_0"] for v in notes["per_layer"].values())
    assert (clipped[0][:, 0] <= bound * (1 + 1e-5)).all()
    assert "sink" in notes["clipped"]


def _layer_norms(model, ids):
    norms = []
    layers = layer_sites(model)
    with attach(model, {name: lambda o: norms.append(hidden_of(o).norm(dim=-1)) for name in layers},
                known=layers), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return norms


def test_clip_residual_bounds_every_layer_output_and_records_it(tiny):
    ids = windows().input_ids
    free = _layer_norms(tiny, ids)
    bound = float(min(n.max() for n in free)) / 2  # clips something in every layer
    stack = stack_of(f"clip-residual:max={bound},target=any", tiny)
    with stack.attach(tiny):  # registered first, so the measuring hooks see clipped outputs
        clipped = _layer_norms(tiny, ids)
    assert all((n <= bound * (1 + 1e-5)).all() for n in clipped)
    assert any((n > bound).any() for n in free)
    notes = stack.record()[0]["applied"]
    assert set(notes["per_layer"]) == {"layers.0", "layers.1"}
    assert all(v["clipped"] > 0 and v["peak_after"] <= bound * (1 + 1e-4) < v["peak_before"]
               for v in notes["per_layer"].values())
    assert notes["per_layer"]["layers.0"]["clipped"] == int((free[0] > bound).sum())
    assert notes["total_clipped"] == sum(v["clipped"] for v in notes["per_layer"].values())
    assert torch.equal(_layer_norms(tiny, ids)[1], free[1])  # hooks are gone after the context


# ---------------------------------------------------------------- sink-token


@pytest.mark.parametrize("prefix", [None, 1])
def test_sink_token_is_never_scored_and_lengthens_windows_by_one(prefix, tiny):
    w = windows(prefix=prefix)
    stack = stack_of("sink-token:token=</s>", tiny)
    out = stack.windows(w)
    assert out.input_ids.shape == (len(w), w.input_ids.shape[1] + 1)
    assert (out.input_ids[:, 0] == 2).all() and not out.scored[:, 0].any()
    assert torch.equal(out.input_ids[:, 1:], w.input_ids) and torch.equal(out.scored[:, 1:], w.scored)
    assert out.n_scored == w.n_scored and torch.equal(out.nbytes, w.nbytes)
    assert out.sink_positions == (0, *(p + 1 for p in w.sink_positions))
    notes = stack.record()[0]["applied"]
    assert notes["token"] == "</s>" and notes["token_id"] == 2 and notes["applied"] is True


def test_sink_token_defaults_to_bos_and_is_a_recorded_noop_when_bos_is_there(tiny):
    stack = stack_of("sink-token", tiny)
    w = windows(prefix=1)
    assert stack.windows(w) is w
    notes = stack.record()[0]["applied"]
    assert notes["applied"] is False and "no-op" in notes["why"] and notes["token_id"] == 1
    assert stack.windows(windows()).input_ids[0, 0] == 1


@pytest.mark.parametrize("token", ["999", "nosuch"])
def test_sink_token_unknown_token_is_a_usage_error(token, tiny):
    with pytest.raises(UsageError):
        stack_of(f"sink-token:token={token}", tiny).windows(windows())


# ---------------------------------------------------------------- intact-kv


def _kv(cache, layer, p):
    return cache.layers[layer].keys[:, :, :p], cache.layers[layer].values[:, :, :p]


@pytest.mark.parametrize("prefix", [None, 1])
def test_intact_kv_hands_the_reference_prefix_kv_to_the_candidate(prefix, tiny):
    w = windows(prefix=prefix)
    cand = copy.deepcopy(tiny)
    with torch.no_grad():
        for p_ in cand.parameters():
            p_.add_(0.05 * torch.randn_like(p_))  # a "quantized" model that differs from the reference
    stack = stack_of("intact-kv", tiny)
    w = stack.windows(w)
    p = prefix_length(w.sink_positions)
    assert p == 1
    with torch.no_grad():
        ref = tiny(input_ids=w.input_ids, use_cache=True)
        ref_prefix = output_cache(tiny(input_ids=w.input_ids[:, :p], use_cache=True))
        alone = cand(input_ids=w.input_ids, use_cache=True)
        with stack.attach(cand):
            out = cand(input_ids=w.input_ids, attention_mask=w.attention_mask, use_cache=False)
    got, want, own = output_cache(out), output_cache(ref), output_cache(alone)
    for layer in range(2):
        for g, e, r, o in zip(_kv(got, layer, p), _kv(ref_prefix, layer, p), _kv(want, layer, p),
                              _kv(own, layer, p)):
            assert torch.equal(g, e) and torch.allclose(g, r, atol=1e-6) and not torch.allclose(g, o, atol=1e-3)
        assert got.layers[layer].keys.shape[2] == w.input_ids.shape[1]
    assert out.logits.shape == ref.logits.shape
    assert torch.allclose(out.logits[:, :p], ref.logits[:, :p], atol=1e-6)  # the prefix is the reference's
    assert not torch.allclose(out.logits[:, p:], alone.logits[:, p:])
    assert stack.record()[0]["applied"]["prefix_length"] == 1


def test_intact_kv_with_the_reference_itself_reproduces_the_reference(tiny):
    w = windows()
    stack = stack_of("intact-kv", tiny)
    w = stack.windows(w)
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        ref = tiny(input_ids=w.input_ids, use_cache=False).logits
        with stack.attach(model):
            out = model(input_ids=w.input_ids, attention_mask=w.attention_mask, use_cache=False).logits
        again = model(input_ids=w.input_ids, use_cache=False).logits  # hooks removed
    assert torch.allclose(out, ref, atol=1e-5) and torch.equal(again, ref)
    assert cache_kwarg(model) in ("cache", "past_key_values")


def test_intact_kv_prefix_follows_sink_token(tiny):
    stack = stack_of("sink-token,intact-kv", tiny)
    w = stack.windows(windows())
    assert prefix_length(stack.envs[1].sink_positions) == 1 and (w.input_ids[:, 0] == 1).all()


# ---------------------------------------------------------------- smooth


def test_smooth_keeps_the_float_function_and_flattens_activation_ranges(tiny):
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = 40.0  # an outlier channel into q/k/v
    before = copy.deepcopy(model)
    stack = stack_of("smooth:alpha=0.5", model)
    w = windows(seed=5)
    model, _ = stack.prepare(model, QuantContext())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=w.input_ids).logits, before(input_ids=w.input_ids).logits,
                              atol=1e-4)
    notes = stack.record()[0]["applied"]
    norm = "model.layers.1.input_layernorm"
    assert sorted(notes["groups"][norm]) == [f"model.layers.1.self_attn.{x}_proj" for x in "kqv"]
    assert notes["folded_into"][norm] == "weight"
    assert set(notes["groups"]) == {f"model.layers.{i}.{n}" for i in range(2)
                                    for n in ("input_layernorm", "post_attention_layernorm")}
    ratio = lambda m: (m.model.layers[1].input_layernorm.weight.detach().abs().max()
                       / m.model.layers[1].input_layernorm.weight.detach().abs().median())
    assert ratio(model) < ratio(before)  # the outlier channel moved into the weights


def test_smooth_wraps_a_norm_whose_weight_is_not_a_plain_scale(tiny):
    from quantsink.mitigations.smooth import ScaledOutput, _fold

    class OnePlusNorm(torch.nn.Module):  # Gemma-style (1 + w) scaling
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8) * 0.1)

        def forward(self, x):
            return x * (1 + self.weight)

    holder = torch.nn.Module()
    holder.norm = OnePlusNorm()
    x = torch.randn(2, 3, 8)
    want = holder.norm(x)
    s = torch.rand(8) + 0.5
    assert _fold(holder, "norm", s, torch.randn(2, 3, 8)) == "wrapper"
    assert isinstance(holder.norm, ScaledOutput)
    assert torch.allclose(holder.norm(x) * s, want, atol=1e-6)


# ---------------------------------------------------------------- sink-fp detect


def test_peak_ratio_finds_the_extreme_position():
    norms = torch.ones(3, 2, 10)  # (L, B, T)
    norms[1, :, 0] = 100.0
    norms[2, 1, 4] = 50.0
    peaks = peak_ratio(norms)
    assert peaks.shape == (2, 10) and peaks[0, 0] == 100 and peaks[1, 4] == 50 and peaks[0, 4] == 1


def test_sink_fp_detect_keeps_the_detected_positions(tiny):
    from quantsink.mitigations.sink_fp import SinkFP

    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.model.embed_tokens.weight[7] *= 300  # token 7 becomes an extreme token
    calib = windows(seed=9)
    calib.input_ids[:, 2] = 7
    env = Env(reference=model, calibration=lambda: calib)
    ctx = SinkFP(name="sink-fp", k="detect", ratio=10.0).quant_context(QuantContext(keep_fp_positions=(0,)), env)
    assert ctx.keep_fp_positions == (0,) and env.notes["predicted_on_calibration"] == [[2]] * len(calib)
    assert ctx.keep_fp(calib.input_ids).nonzero()[:, 1].tolist() == [2] * len(calib)  # per window, anywhere
    ctx = SinkFP(name="sink-fp", k=3).quant_context(QuantContext(), Env())
    assert ctx.keep_fp_positions == (0, 1, 2)


# ---------------------------------------------------------------- sink-fp with the simulated schemes


def _site_io(model, ids, stack, **inputs):
    """{fqn: (quantizer input, quantizer output)} of every activation / KV quantizer, one forward
    with the run's hooks (``stack.attach``) attached."""
    from quantsink.hooks.sites import Hook
    from quantsink.schemes.simulated import quantizers

    seen = {}
    grab = {f: Hook(lambda x, f=f: seen.__setitem__(f, x), "input") for f in quantizers(model)}
    out = {f"{f}.out": (lambda y, f=f: seen.__setitem__(f, (seen[f], y))) for f in quantizers(model)}
    known = {**dict(model.named_modules()), **{f"{f}.out": q for f, q in quantizers(model).items()}}
    with stack.attach(model), attach(model, {**grab, **out}, known=known), torch.no_grad():
        model(input_ids=ids, use_cache=False, **inputs)
    return seen


def _float_io(model, ids, sites):
    """The float model's tensors at the same sites: Linear inputs (activations) or outputs (KV)."""
    seen = {}
    hooks = {}
    for site in sites:
        fqn, _, kind = site.rpartition(".")
        on = "input" if kind == "input_quantizer" else "output"
        hooks.setdefault(fqn, []).append(Hook(lambda x, s=site: seen.__setitem__(s, x), on))
    with attach(model, hooks, known=dict(model.named_modules())), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return seen


def _candidate(tiny, scheme, mitigation):
    """What ``run.build_candidate`` does: prepare, apply, calibrate with every hook attached."""
    stack = stack_of(mitigation, tiny, scheme=scheme)
    ctx = QuantContext(calibration=lambda: stack.windows(windows(seed=9)))
    model, ctx = stack.prepare(copy.deepcopy(tiny), ctx)
    model = parse_scheme(scheme).apply(model, ctx)
    stack.scheme_hooks = ctx.hooks
    with stack.attach(model):
        parse_scheme(scheme).calibrate(model, ctx)
    return model, ctx, stack


@pytest.mark.parametrize("scheme", ["w8a8-dyn:w_bits=none", "w8a8-tok:w_bits=none", "w8a8:w_bits=none",
                                    "kv4", "w8a8-kv8:w_bits=none"])
def test_sink_fp_leaves_position_0_bit_identical_to_float_at_every_quantized_input(tiny, scheme):
    ids = windows().input_ids
    ids[:, 0] = 5  # one token everywhere: its states grow large in no particular way, it is just position 0
    for mitigation, identical in (("sink-fp", True), ("none", False)):
        model, ctx, stack = _candidate(tiny, scheme, mitigation)
        quant = _site_io(model, ids, stack)
        ref = _float_io(tiny, ids, list(quant))
        assert quant and set(ref) == set(quant)
        same0 = [torch.equal(out[:, 0], ref[site][:, 0]) for site, (_, out) in quant.items()]
        assert all(same0) if identical else not all(same0)
        assert any(not torch.equal(out[:, 1:], inp[:, 1:]) for inp, out in quant.values())  # the rest is quantized
    assert ctx.keep_fp_positions == ()


def test_sink_fp_keeps_position_0_out_of_static_calibration_ranges(tiny):
    from quantsink.schemes.simulated import ActQuantizer, quantizers

    ranges = {}
    for mitigation in ("none", "sink-fp"):
        model, _, _ = _candidate(tiny, "w8a8:w_bits=none", mitigation)
        ranges[mitigation] = {f: float(q.hi - q.lo) for f, q in quantizers(model, ActQuantizer).items()}
    assert all(ranges["sink-fp"][f] <= ranges["none"][f] for f in ranges["none"])
    assert any(ranges["sink-fp"][f] < ranges["none"][f] for f in ranges["none"])


def test_intact_kv_with_sink_fp_keeps_the_right_absolute_positions(tiny):
    """The candidate sees positions p.. through the reference's prefix cache; the scheme's keep mask
    must use absolute positions (cache offset), so sink-fp:k=2 keeps absolute position 1 = its first row."""
    from quantsink.schemes.simulated import quantizers

    model, _, stack = _candidate(tiny, "kv4", "sink-fp:k=2,intact-kv")
    w = stack.windows(windows())
    seen = _site_io(model, w.input_ids, stack, attention_mask=w.attention_mask)
    assert seen and attached_hooks(model) == 0
    for inp, out in seen.values():
        assert inp.shape[1] == w.input_ids.shape[1] - 1  # the prefix came from the reference
        assert torch.equal(out[:, 0], inp[:, 0]) and not torch.equal(out[:, 1:], inp[:, 1:])


def test_intact_kv_leaves_the_prefix_out_of_static_calibration(tiny):
    from quantsink.schemes.simulated import ActQuantizer, quantizers

    model, ctx, _ = _candidate(tiny, "w8a8:w_bits=none", "intact-kv")
    plain, _, _ = _candidate(tiny, "w8a8:w_bits=none", "sink-fp")
    assert ctx.keep_fp_positions == (0,)
    def ranges(m):
        return torch.tensor([(float(q.lo), float(q.hi)) for q in quantizers(m, ActQuantizer).values()])

    # calibrated with intact-kv attached: position 0's states come from the float reference, as they do
    # (in float, weights unquantized) under sink-fp; position 0 is in neither range
    torch.testing.assert_close(ranges(model), ranges(plain), rtol=1e-4, atol=1e-5)


def test_intact_kv_run_with_stats_keeps_reference_stats_and_says_why_candidate_has_none(
        tiny_model_dir, tiny_text_file, tmp_path):
    from quantsink.config import RunConfig
    from quantsink.pipeline.execute import run_config

    record, effects = run_config(RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}",
                                           scheme="w8a8-dyn", mitigation="intact-kv", window=32, max_tokens=128,
                                           calib_windows=1, stats_windows=2, device="cpu", results=str(tmp_path)))
    stats = record.stats
    assert stats.reference["layers"] and stats.candidate is None and stats.changes is None
    assert "intact-kv" in stats.note
    assert effects.mitigation_effect["verdict"] == "insufficient-data"  # 4 windows < min_windows
