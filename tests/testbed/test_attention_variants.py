"""The remedies lab's attention variants: each kernel against a direct computation, and the learned
parameters (sink logits, gates) through training, save, ``load_model`` and ``quantsink eval``."""

from __future__ import annotations

import json

import pytest
import torch

from quantsink.hooks.attention import KERNELS, SOFTPICK_EPS, add_parameters, attend, register
from quantsink.testbed.train import TrainConfig, train

TINY = dict(d=32, seq_len=32, batch=4, eval_every=2, probe_batch=4, heldout=3, precision="float32", device="cpu")
LEARNED = ("sink-logit", "gated")
NEW = ("softmax1", "sink-logit", "gated", "softpick")


class Heads(torch.nn.Module):
    """Just what the kernels read from an attention module: q_proj, heads, head size, and training."""

    def __init__(self, heads: int = 2, head_dim: int = 3):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.q_proj = torch.nn.Linear(heads * head_dim, heads * head_dim, bias=False)


def qkv(seed: int = 0, t: int = 5, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(1, 2, t, 3, generator=g, dtype=torch.float64) for _ in range(3)]  # (B, H, T, D)


def direct(rule, q, k, v):
    """out[h, i] = sum_{j <= i} w(h, i, j) v[h, j], one scalar at a time (float64)."""
    _, heads, t, d = q.shape
    out, weights = torch.zeros(1, heads, t, d, dtype=torch.float64), torch.zeros(1, heads, t, t, dtype=torch.float64)
    for h in range(heads):
        for i in range(t):
            scores = [float((q[0, h, i] @ k[0, h, j]).detach()) / d ** 0.5 for j in range(i + 1)]
            for j in range(i + 1):
                weights[0, h, i, j] = rule(h, i, j, scores)
            out[0, h, i] = sum(weights[0, h, i, j] * v[0, h, j] for j in range(i + 1))
    return out, weights


def kernel_out(name, module, q, k, v):
    out, weights = attend(KERNELS.get(name), module.double(), q, k, v, None, scaling=q.shape[-1] ** -0.5)
    return out.transpose(1, 2), weights  # (B, H, T, D), (B, H, T, S)


def exp(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).exp())


def test_softmax1_is_exp_over_one_plus_the_sum():
    q, k, v = qkv(0)
    expected = direct(lambda h, i, j, s: exp(s[j]) / (1 + sum(exp(x) for x in s)), q, k, v)
    got = kernel_out("softmax1", Heads(), q, k, v)
    torch.testing.assert_close(got, expected)
    assert (got[1].sum(-1) < 1).all()  # a head may attend to less than everything


def test_sink_logit_puts_each_heads_learned_logit_in_the_denominator():
    q, k, v = qkv(1)
    module = add_parameters_to(Heads(), "sink-logit")
    with torch.no_grad():
        module.sinks.copy_(torch.tensor([1.5, -0.7]))
    logit = [1.5, -0.7]
    expected = direct(lambda h, i, j, s: exp(s[j]) / (exp(logit[h]) + sum(exp(x) for x in s)), q, k, v)
    torch.testing.assert_close(kernel_out("sink-logit", module, q, k, v), expected)


def test_softpick_is_the_rectified_softmax_even_for_large_scores():
    for scale in (1.0, 4.0):  # 4.0: scores ~ 30, exp overflows nothing only thanks to the shift
        q, k, v = qkv(2, scale=scale)
        rule = lambda h, i, j, s: max(exp(s[j]) - 1, 0.0) / (sum(abs(exp(x) - 1) for x in s) + SOFTPICK_EPS)  # noqa: E731
        got = kernel_out("softpick", Heads(), q, k, v)
        torch.testing.assert_close(got, direct(rule, q, k, v), rtol=1e-9, atol=1e-12)
    assert (got[1] == 0).any() and (got[1] >= 0).all()  # negative scores get exactly zero weight


def test_relu_kernel_is_relu_over_the_query_position():
    q, k, v = qkv(3)
    expected = direct(lambda h, i, j, s: max(s[j], 0.0) / (i + 1), q, k, v)
    torch.testing.assert_close(kernel_out("relu", Heads(), q, k, v), expected)


def test_gated_multiplies_each_head_output_by_a_sigmoid_of_the_block_input():
    """Through a real OPT attention module: the gate reads the module's input hidden state x."""
    from transformers import OPTConfig
    from transformers.models.opt.modeling_opt import OPTAttention

    register()
    config = OPTConfig(hidden_size=6, num_attention_heads=2, enable_bias=False, attention_dropout=0.0)
    config._attn_implementation = KERNELS.get("gated").implementation
    module = add_parameters_to(OPTAttention(config).double().eval(), "gated")
    x = torch.randn(1, 5, 6, dtype=torch.float64)
    got, weights = module(hidden_states=x)
    split = lambda t: t.view(1, 5, 2, 3).transpose(1, 2)  # noqa: E731  (B, H, T, D)
    q, k, v = split(module.q_proj(x)), split(module.k_proj(x)), split(module.v_proj(x))
    plain, expected_weights = direct(lambda h, i, j, s: exp(s[j]) / sum(exp(y) for y in s), q, k, v)
    gate = split(torch.sigmoid(x @ module.gate_proj.weight.T))  # (B, H, T, D): one gate per head and channel
    expected = module.out_proj((plain * gate).transpose(1, 2).reshape(1, 5, 6))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(weights, expected_weights)  # the weights returned are the softmax, before the gate
    assert "_gate_input" not in module.__dict__  # the kept input does not outlive the call


def add_parameters_to(module, name):
    holder = torch.nn.ModuleList([module])
    add_parameters(holder, name)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = {}
    for attention in (*NEW, "relu"):
        where = tmp_path_factory.mktemp(attention)
        train(TrainConfig(out=str(where), layers=1, attention=attention, steps=4, **TINY))
        out[attention] = where
    return out


@pytest.mark.parametrize("attention", LEARNED)
def test_learned_parameters_survive_save_and_load(trained, attention):
    from safetensors.torch import load_file

    from quantsink.data.models import load_model
    from quantsink.testbed.model import build_model

    where = trained[attention]
    saved = load_file(str(where / "model.safetensors"))
    extra = [k for k in saved if k.endswith((".sinks", ".gate_proj.weight"))]
    assert len(extra) == 1
    loaded = load_model(str(where), device="cpu").model
    torch.testing.assert_close(loaded.state_dict()[extra[0]], saved[extra[0]])
    config = json.loads((where / "config.json").read_text())
    assert config["quantsink_attention"] == attention and "auto_map" not in config  # no remote code
    rebuilt = build_model(loaded.config)
    rebuilt.load_state_dict(saved, strict=True)  # every saved tensor has its place, none is missing
    ids = torch.arange(12)[None]
    torch.testing.assert_close(loaded(ids).logits, rebuilt.eval()(ids).logits)
    with torch.no_grad():  # and the attention reads them: change them, the logits change
        for name, param in loaded.named_parameters():
            if name == extra[0]:
                param.add_(3.0)
    assert not torch.allclose(loaded(ids).logits, rebuilt(ids).logits)


def test_trained_sink_logits_moved_from_their_zero_init(trained):
    from safetensors.torch import load_file

    sinks = next(v for k, v in load_file(str(trained["sink-logit"] / "model.safetensors")).items() if k.endswith("sinks"))
    assert sinks.abs().min() > 0


@pytest.mark.parametrize("attention", (*NEW, "relu"))
def test_quantsink_eval_scores_each_variant(trained, attention, tmp_path):
    """``quantsink eval --model DIR``: the reference NLL of the first held-out row is the one the
    variant (with its learned parameters) gives, not the one plain softmax attention would give."""
    from typer.testing import CliRunner

    from quantsink.cli import app
    from quantsink.data.models import load_model

    where = trained[attention]
    args = ["eval", "--model", str(where), "--corpus", f"file:{where}/heldout.jsonl", "--protocol", "lm-eval",
            "--window", "31", "--max-tokens", "62", "--calib-windows", "1", "--calib-draws", "1", "--stats-windows", "2", "--scheme",
            "w8a8", "--device", "cpu", "--results", str(tmp_path), "--offline", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)["record"]
    assert record["candidate"]["ppl"] > 1
    loaded = load_model(str(where), device="cpu")
    text = json.loads((where / "heldout.jsonl").read_text().splitlines()[0])["text"]
    ids = torch.tensor([[loaded.tokenizer.bos_token_id, *loaded.tokenizer(text)["input_ids"]]])  # (1, 32)

    def nll(model):
        logits = model(ids[:, :-1]).logits[0]  # (31, V)
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))

    assert nll(loaded.model) == pytest.approx(record["reference"]["nll_per_window"][0], abs=1e-4)
    loaded.model.set_attn_implementation("eager")  # plain softmax, same weights
    assert nll(loaded.model) != pytest.approx(record["reference"]["nll_per_window"][0], abs=1e-4)


def test_practical_verdict_needs_the_whole_interval_past_the_margin():
    import math

    from quantsink.testbed.report import practical_verdict, spread

    m = math.log1p(0.005)
    assert practical_verdict([-3 * m, -2 * m]) == "helps"
    assert practical_verdict([2 * m, 3 * m]) == "hurts"
    assert practical_verdict([1e-6, 2e-6]) == "no practical effect"  # significant, but far below 0.5% ppl
    assert practical_verdict([-2 * m, 0.0]) == "inconclusive"
    assert practical_verdict([0.5 * m, 2 * m]) == "inconclusive"
    s = spread([1.0, 3.0, float("nan")])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 2) and s["sd"] == pytest.approx(2 ** 0.5)
