"""Hook sites, attach/detach and the stats collector on tiny models built from configs (no download)."""

import os

import pytest
import torch
from torch import nn

from quantsink.hooks import sites as hooks
from quantsink.data.windows import Windows
from quantsink.errors import QuantsinkError
from quantsink.measure.passes import run_pass
from quantsink.measure.collector import StatsCollector
from quantsink.hooks.probes import PROBE_PREFIX

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 96


def tiny(kind: str = "llama") -> nn.Module:
    """A 2-layer decoder of the given family, random weights, SDPA attention."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    configs = {
        "llama": lambda: (tf.LlamaConfig(**common), tf.LlamaForCausalLM),
        "qwen2": lambda: (tf.Qwen2Config(**common), tf.Qwen2ForCausalLM),
        "gemma3": lambda: (tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"]),
                           tf.Gemma3ForCausalLM),
    }
    config, cls = configs[kind]()
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="sdpa")
    return model.eval()


def windows(n: int = 3, t: int = 24) -> Windows:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (n, t), generator=g)
    scored = torch.ones(n, t, dtype=torch.bool)
    scored[:, 0] = False
    return Windows(ids, torch.ones_like(ids), scored, torch.full((n,), t - 1))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_canonical_sites_found_generically(kind):
    model = tiny(kind)
    names = hooks.sites(model)
    for layer in (0, 1):
        for site in ("", ".attn", ".attn.v_proj", ".attn.q_proj.in", ".attn.o_proj.in",
                     ".mlp.up_proj.in", ".mlp.down_proj.in"):
            assert f"layers.{layer}{site}" in names
    assert names["layers.1.attn.v_proj"] is model.model.layers[1].self_attn.v_proj
    assert sum(name.endswith(".in") for name in names) == 14  # 7 Linear inputs per block, lm_head not a site


def test_wrapped_linear_is_one_site_under_its_own_name():
    class Wrapped(nn.Module):  # what a simulated-quantization scheme might put in place of a Linear
        def __init__(self, inner: nn.Linear):
            super().__init__()
            self.inner, self.in_features, self.out_features = inner, inner.in_features, inner.out_features

        def forward(self, x):
            return self.inner(x)

    model = tiny()
    mlp = model.model.layers[0].mlp
    mlp.down_proj = Wrapped(mlp.down_proj)
    names = hooks.sites(model)
    assert names["layers.0.mlp.down_proj.in"] is mlp.down_proj
    assert not any("inner" in name for name in names)


def test_attach_detaches_even_when_the_forward_raises():
    model = tiny()
    before = _hook_count(model)
    seen = []

    def boom(out):
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        with hooks.attach(model, {"layers.0.mlp.down_proj.in": seen.append, "layers.1": boom}):
            assert _hook_count(model) == before + 2
            model(input_ids=torch.tensor([[3, 4, 5]]))
    assert _hook_count(model) == before and len(seen) == 1
    with pytest.raises(QuantsinkError, match="unknown hook site"):
        with hooks.attach(model, {"layers.0": seen.append, "layers.9.attn": seen.append}):
            pass
    assert _hook_count(model) == before


def test_collector_restores_attention_and_hooks_when_the_forward_raises():
    model = tiny()
    before = _hook_count(model)
    collector = StatsCollector(model, stats_windows=2)
    part = windows(2)
    with pytest.raises(ValueError, match="boom"):
        with collector.batch_context(slice(0, 2), part):
            assert model.config._attn_implementation == PROBE_PREFIX + "sdpa"  # the same kernel, probed
            raise ValueError("boom")
    assert model.config._attn_implementation == "sdpa" and _hook_count(model) == before
    with pytest.raises(ValueError, match="straddles"):
        with collector.batch_context(slice(1, 3), part):
            pass


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_stats_ride_on_the_pass_without_changing_it(kind):
    model, wins = tiny(kind), windows(3)
    plain = run_pass(model, wins, batch_tokens=48)
    with StatsCollector(model, stats_windows=2) as collector:
        probed = run_pass(model, wins, batch_tokens=48, batch_context=collector.batch_context,
                          boundaries=collector.boundaries)
    assert torch.equal(probed.nll, plain.nll)  # bitwise: the probed rows run the same kernels
    out = collector.summary()
    assert out["protocol"]["windows"] == 2 and len(out["layers"]) == 2
    assert len(out["heads"]["sink_score"][0]) == 4 and len(out["heads"]["value_drain"][0]) == 2  # KV heads
    assert all(0 <= s <= 1 for row in out["heads"]["sink_score"] for s in row)
    assert set(out["linear_inputs"]["sites"]) == {n for n in hooks.sites(model) if n.endswith(".in")}
    assert model.config._attn_implementation == "sdpa" and _hook_count(model) == 0


def test_planted_massive_activation_becomes_the_extreme_token():
    """A state planted at (position 3, channel 7) after block 0 is found there, from the data."""
    model, wins = tiny(), windows(2)

    def plant(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 3, 7] = 1e4
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.model.layers[0].register_forward_hook(plant)
    try:
        with StatsCollector(model, stats_windows=2) as collector:
            run_pass(model, wins, batch_tokens=48, batch_context=collector.batch_context,
                     boundaries=collector.boundaries)
    finally:
        handle.remove()
    out = collector.summary()
    first = out["layers"][0]
    assert (first["massive_position"], first["massive_channel"]) == (3, 7)
    assert first["massive_activation"] == 1e4 and first["massive_ratio"] > 1000
    assert out["extreme_tokens"]["per_window"] == [[3], [3]]
    absmax, without, _ = out["linear_inputs"]["sites"]["layers.1.attn.q_proj.in"]
    assert without < absmax  # the planted token dominates the next block's input, until left out


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_attention_probes_beside_sdpa_equal_eager_probabilities(kind):
    """The probabilities computed beside the SDPA kernel are eager attention's (sliding window included)."""
    model, ids = tiny(kind), windows(2, 20).input_ids
    seen = {}

    def probe(impl):
        model.set_attn_implementation(impl)
        def keep(p, row, i):
            seen.setdefault(impl, {}).setdefault(i, []).append(p.clone())  # the probe's buffer is reused

        hooks_ = {f"layers.{i}.attn": hooks.Hook(lambda p, row, i=i: keep(p, row, i), "attention") for i in range(2)}
        with hooks.attach(model, hooks_), torch.no_grad():
            out = model(input_ids=ids).logits
        assert model.config._attn_implementation == impl and _hook_count(model) == 0
        return out

    sdpa, eager = probe("sdpa"), probe("eager")
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-4)
    for i in range(2):
        torch.testing.assert_close(torch.cat(seen["sdpa"][i]), torch.cat(seen["eager"][i]), rtol=1e-5, atol=1e-6)
    assert [p.shape for p in seen["sdpa"][0]] == [(1, 4, 20, 20)] * 2  # row by row


def test_attach_replaces_outputs_inputs_and_call_kwargs_then_removes_everything():
    model, ids = tiny(), windows(1, 8).input_ids
    with torch.no_grad():
        base = model(input_ids=ids).logits
    shifted = lambda args, kwargs: (args, {**kwargs, "input_ids": kwargs["input_ids"][:, 1:]})  # noqa: E731
    replace = {"model": hooks.Hook(shifted, "call"), "head": hooks.Hook(lambda x: x * 0, "input")}
    with hooks.attach(model, replace), torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.shape[1] == ids.shape[1] - 1 and torch.equal(out, torch.zeros_like(out))
    with hooks.attach(model, {"layers.1": lambda o: hooks.with_hidden(o, hooks.hidden_of(o) * 0)}), torch.no_grad():
        flat = model(input_ids=ids).logits
    assert torch.allclose(flat, flat[:, :1].expand_as(flat))  # every position sees the same (zero) state
    assert _hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
