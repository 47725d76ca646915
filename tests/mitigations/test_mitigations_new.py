"""rotate, cushion and sink-fp:k=detect (KVSink) on tiny models built from a config."""

import copy

import pytest
import torch

from quantsink.data.corpus import TokenStream
from quantsink.data.windows import sliding_windows
from quantsink.errors import QuantsinkError, UsageError
from quantsink.mitigations import Env, MitigationStack, parse_mitigations
from quantsink.schemes import QuantContext, parse_scheme

VOCAB = 96


def llama(tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    for m in model.modules():  # norms with gains != 1, so folding them matters
        if type(m).__name__.endswith("RMSNorm"):
            m.weight.data = torch.rand_like(m.weight) + 0.5
    return model


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    for m in model.modules():  # (1 + w) gains
        if type(m).__name__.endswith("RMSNorm"):
            m.weight.data = torch.randn_like(m.weight) * 0.3
    return model


class TinyTokenizer:
    bos_token_id, bos_token = 1, "<s>"

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


def windows(n=3, t=12, seed=0, prefix=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n * t,), generator=g).tolist()
    w, _ = sliding_windows(TokenStream(ids, [1] * len(ids)), window=t, stride=t, prefix=prefix, max_tokens=n * t)
    return w


def stack_of(spec, model, scheme="w8a8-dyn", calib=None):
    calib = calib or windows(seed=9)
    return MitigationStack.of(parse_mitigations(spec), reference=model, tokenizer=TinyTokenizer(),
                              scheme=parse_scheme(scheme), calibration=lambda: calib)


def prepared(spec, model, scheme="w8a8-dyn", calib=None):
    stack = stack_of(spec, model, scheme, calib)
    candidate, ctx = stack.prepare(copy.deepcopy(model), QuantContext(calibration=stack.calibration))
    return stack, candidate, ctx


def quantized(stack, candidate, ctx, scheme):
    """The scheme applied, its hooks handed to the stack (as ``run.build_candidate`` does)."""
    candidate = parse_scheme(scheme).apply(candidate, ctx)
    stack.scheme_hooks = ctx.hooks
    return candidate


def logits(model, ids, stack=None):
    from contextlib import nullcontext

    with torch.no_grad(), stack.attach(model) if stack else nullcontext():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bad", ["rotate:online=up", "rotate:seed=x", "rotate:gain=drop", "cushion:length=0", "cushion:tokens=1",
                                 "sink-fp:k=detect,channels=0", "sink-fp:k=detect,layer=-1"])
def test_bad_specs_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_mitigations(bad)


# ---------------------------------------------------------------- rotate


@pytest.mark.parametrize("n", [12, 20, 32, 576, 640, 1536])
def test_hadamard_orders_of_the_embedded_models(n):
    from quantsink.mitigations.rotate import hadamard, random_hadamard

    h = hadamard(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = random_hadamard(n, torch.Generator().manual_seed(1))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_hadamard_refuses_an_order_it_cannot_build():
    from quantsink.mitigations.rotate import hadamard, random_hadamard

    assert hadamard(6) is None
    with pytest.raises(QuantsinkError, match="order 6"):
        random_hadamard(6, torch.Generator())


@pytest.mark.parametrize("tie", [False, True])
def test_rotate_keeps_the_float_logits_and_unties_a_tied_head(tie):
    model = llama(tie=tie)
    stack, candidate, _ = prepared("rotate", model)
    notes = stack.envs[0].notes
    ids = windows(seed=3).input_ids
    diff = (logits(candidate, ids, stack) - logits(model, ids)).abs().max()
    assert diff < 1e-5 and notes["float_max_logit_diff"] < 1e-5
    assert notes["writers_rotated"] == 4 and notes["online_down_rotations"] == 2
    assert "model.norm" in notes["norms_folded"]
    assert candidate.lm_head.weight is not candidate.model.embed_tokens.weight
    assert not torch.allclose(candidate.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_rotate_online_none_rotates_no_down_projection():
    stack, candidate, _ = prepared("rotate:online=none,seed=3", llama())
    assert stack.envs[0].notes["online_down_rotations"] == 0 and stack.envs[0].notes["seed"] == 3
    assert stack.envs[0].state["online"] == {}


def test_rotate_is_exact_on_gemma3_with_online_rotations_after_the_post_norms():
    model = gemma3()
    stack, candidate, _ = prepared("rotate", model)
    notes = stack.envs[0].notes
    ids = windows(seed=3).input_ids
    assert (logits(candidate, ids, stack) - logits(model, ids)).abs().max() < 1e-5
    assert (logits(candidate, ids) - logits(model, ids)).abs().max() > 1e-3  # the online rotations matter
    assert len(notes["online_residual_rotations"]) == 4 and notes["writers_rotated"] == 0
    assert all(float(n.weight.detach().abs().max()) < 1e-4 for f, n in candidate.named_modules()  # (1 + w) -> 1
               if f in notes["norms_folded"])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rotate_gain_keep_is_exact_and_leaves_gains_residual_and_head_alone(family):
    model = llama() if family == "llama" else gemma3()
    stack, candidate, _ = prepared("rotate:gain=keep", model)
    notes = stack.envs[0].notes
    ids = windows(seed=4).input_ids
    assert (logits(candidate, ids, stack) - logits(model, ids)).abs().max() < 1e-5
    assert (logits(candidate, ids) - logits(model, ids)).abs().max() > 1e-3  # the online rotations matter
    assert notes["gain"] == "keep" and notes["writers_rotated"] == 0 and "norms_folded" not in notes
    ours, theirs = dict(candidate.named_parameters()), dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(ours[name], theirs[name])  # residual stream and gains untouched
    assert torch.equal(candidate.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert "model.norm" not in notes["norms_rotated_online"]  # the head is never quantized: not rotated


def test_rotate_spreads_a_massive_activation_over_the_channels():
    model = llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = 0.01
        model.model.embed_tokens.weight[7, 5] = 50.0  # token 7: one massive channel
    _, candidate, _ = prepared("rotate", model)
    ids = torch.tensor([[7, 4, 9, 12]])
    seen = {}
    hooks = [m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args, name=name: seen.__setitem__(name, args[0][0, 0].abs())) for name, m in
        (("float", model), ("rotated", candidate))]
    with torch.no_grad():
        model(input_ids=ids), candidate(input_ids=ids)
    for h in hooks:
        h.remove()
    # unit gain after folding: the rotated normed state is spread evenly (|x_c| = 1 when one channel dominated)
    assert seen["float"].max() > 5 and seen["rotated"].max() < 1.5


def test_rotate_online_hadamard_runs_before_the_schemes_input_quantizer():
    from quantsink.hooks.sites import attached_hooks

    model = llama()
    stack, candidate, ctx = prepared("rotate", model, scheme="w8a8-dyn")
    candidate = quantized(stack, candidate, ctx, "w8a8-dyn")
    down = candidate.model.layers[0].mlp.down_proj
    seen = {}
    h1 = down.input_quantizer.register_forward_pre_hook(lambda m, args: seen.__setitem__("quantized", args[0]))
    h2 = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("float",
                                                                                                          args[0]))
    ids = windows(seed=3).input_ids
    out, ref = logits(candidate, ids, stack), logits(model, ids)
    h1.remove(), h2.remove()
    assert type(down).__name__ == "QuantLinear" and attached_hooks(candidate) == 0
    # the quantizer sees the rotated input: the same norm per token (up to int8 noise upstream), other values
    q, f = seen["quantized"], seen["float"]
    assert torch.allclose(q.norm(dim=-1), f.norm(dim=-1), rtol=0.03)
    assert (q - f).norm() > 0.5 * f.norm()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # int8 on a rotated model stays close


def test_rotate_refuses_a_norm_that_is_not_an_rmsnorm():
    from quantsink.mitigations.rotate import unit_gain

    with pytest.raises(QuantsinkError, match="not an RMSNorm"):
        unit_gain(torch.nn.LayerNorm(8), 8)


# ---------------------------------------------------------------- cushion


def test_cushion_picks_the_candidate_with_the_smallest_site_maxima():
    from quantsink.mitigations.cushion import objective

    model = llama()
    stack = stack_of("cushion:length=1,candidates=6,tokens=8,windows=2", model)
    windows_out = stack.windows(windows())
    notes = stack.envs[0].notes
    chosen = notes["token_ids"]
    assert len(chosen) == 1 and windows_out.input_ids.shape[1] == 13 and windows_out.sink_positions == (0,)
    assert torch.equal(windows_out.input_ids[:, 0], torch.full((3,), chosen[0]))
    assert not windows_out.scored[:, 0].any() and notes["search_windows"] == 2 and notes["tokens"] == [f"t{chosen[0]}"]
    pool = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:6]
    body = windows(seed=9).input_ids[:2, :8]
    scores = [float(objective(model, torch.cat([torch.full((2, 1), int(c)), body], 1),
                              torch.ones(2, 9, dtype=torch.long), 1).mean()) for c in pool]
    assert chosen[0] == int(pool[int(torch.tensor(scores).argmin())])
    assert notes["objective_per_step"][0] == pytest.approx(min(scores), rel=1e-5)
    again = stack_of("cushion:length=1,candidates=6,tokens=8,windows=2", model, scheme="kv4")
    again.windows(windows())
    assert again.envs[0].notes["search_reused"] and again.envs[0].notes["token_ids"] == chosen


@pytest.mark.parametrize("build", [llama, gemma3])
def test_cushion_hands_the_reference_prefix_kv_to_the_candidate(build):
    model = build()  # gemma3: windows (23 positions) longer than its sliding window (8)
    stack = stack_of("cushion:length=2,candidates=4,tokens=8", model, scheme="w8a8", calib=windows(seed=9, prefix=1))
    w = stack.windows(windows(prefix=1, t=20))  # BOS windows: the kept prefix is cushion + BOS
    assert w.sink_positions == (0, 1, 2)
    _, ctx = stack.prepare(copy.deepcopy(model), QuantContext(calibration=stack.calibration))
    assert ctx.keep_fp_positions == (0, 1, 2)
    candidate = copy.deepcopy(model)  # float "candidate": must give the reference's logits exactly
    seen = []
    candidate.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    with torch.no_grad(), stack.attach(candidate):
        out = candidate(input_ids=w.input_ids, attention_mask=w.attention_mask, use_cache=False).logits
    with torch.no_grad():
        ref = model(input_ids=w.input_ids, use_cache=False).logits
    assert seen == [w.input_ids.shape[1] - 3] and stack.envs[0].notes["prefix_length"] == 3
    assert torch.allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------- sink-fp:k=detect (KVSink)


def test_predict_and_stable_channels_on_a_synthetic_state():
    from quantsink.mitigations.sink_detect import predict, stable_channels

    h = torch.randn(4, 10, 16) * 0.1
    h[0, 3, 7] = h[1, 0, 7] = h[2, 5, 7] = h[3, 9, 7] = 100.0
    h[0, 3, 2] = 60.0  # one window only: not stable
    assert stable_channels(h, 20.0, 2) == [7]
    assert predict(h, [7], 20.0).nonzero().tolist() == [[0, 3], [1, 0], [2, 5], [3, 9]]


def _extreme_token_model():
    model = llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 5] = 300.0  # token 7 carries a massive channel from layer 0 on
    return model


def test_sink_fp_detect_predicts_sinks_anywhere_per_window_and_records_them():
    model = _extreme_token_model()
    calib = windows(n=4, seed=9)
    calib.input_ids[calib.input_ids == 7] = 8
    calib.input_ids[torch.arange(4), torch.tensor([0, 3, 5, 0])] = 7
    stack, candidate, ctx = prepared("sink-fp:k=detect,ratio=10", model, scheme="w8a8-dyn", calib=calib)
    notes = stack.envs[0].notes
    assert notes["layer"] == 0 and notes["channels"][0] == 5
    assert notes["predicted_on_calibration"] == [[0], [3], [5], [0]]
    candidate = quantized(stack, candidate, ctx, "w8a8-dyn")
    w = windows(n=2, seed=4)
    w.input_ids[w.input_ids == 7] = 8
    w.input_ids[0, 6] = w.input_ids[1, 2] = w.input_ids[1, 9] = 7
    seen = []
    q = candidate.model.layers[1].self_attn.q_proj.input_quantizer
    q.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad(), stack.attach(candidate):
        candidate(input_ids=w.input_ids)
    kept = notes["kept"]
    assert kept["positions"] == [[6], [2, 9]] and kept["kept_per_window"] == [1, 2]
    assert kept["windows_keeping_beyond_0"] == 2
    x, out = seen[0]
    assert torch.equal(out[0, 6], x[0, 6]) and torch.equal(out[1, 9], x[1, 9]) and not torch.equal(out[0, 5], x[0, 5])


def test_sink_fp_detect_keeps_nothing_and_says_so_without_extreme_tokens():
    stack, _, ctx = prepared("sink-fp:k=detect", llama(), scheme="kv4")
    notes = stack.envs[0].notes
    assert notes["layer"] is None and "nothing is kept" in notes["why"]
    assert not ctx.keep_fp(windows().input_ids).any()


# ---------------------------------------------------------------- end to end on the tiny Llama


@pytest.mark.parametrize("mitigation", ["rotate", "cushion:length=1,candidates=4,tokens=16", "sink-fp:k=detect",
                                        "rotate,sink-fp"])
def test_new_mitigations_run_end_to_end(tiny_model_dir, tiny_text_file, tmp_path, mitigation):
    from quantsink.config import RunConfig
    from quantsink.pipeline.execute import run_config

    config = RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", scheme="w8a8",
                       mitigation=mitigation, max_tokens=128, window=32, calib_windows=2, stats_windows=1,
                       results=str(tmp_path))
    record, effects = run_config(config)
    verdict = effects.mitigation_effect["verdict"]  # 4 windows: never helps/hurts; k=detect may keep nothing here
    assert record.candidate.ppl > 1 and verdict in ("insufficient-data", "not-applicable")
    assert record.mitigation[0].applied and effects.d_sink is not None
