"""The Bigram-Backcopy testbed: generator statistics, training, resume, save/load, ReLU attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from quantsink.testbed.data import BOS, build_tokenizer, default_task
from quantsink.testbed.train import TrainConfig, train

TINY = dict(d=32, seq_len=32, batch=4, eval_every=2, probe_batch=4, heldout=3, precision="float32", device="cpu")


@pytest.fixture(scope="module")
def task():
    return default_task(seq_len=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny softmax and a tiny ReLU model, 4 steps each."""
    out = {}
    for attention in ("softmax", "relu"):
        where = tmp_path_factory.mktemp(attention)
        final = train(TrainConfig(out=str(where), layers=1, attention=attention, steps=4, **TINY))
        out[attention] = (where, final)
    return out


def test_generator_backcopies_after_every_trigger(task):
    seqs = task.sample(np.random.default_rng(0), 200)  # (B, T+1)
    assert (seqs[:, 0] == task.bos_id).all() and (seqs[:, 1:] != task.bos_id).all()
    assert not task.trigger_mask(seqs[:, 1]).any()  # x1 from the marginal without triggers
    after = task.trigger_mask(seqs[:, 1:-1])  # (B, T-1): x_{t-1} is a trigger, for t = 2..T
    assert after.sum() > 1000
    assert (seqs[:, 2:][after] == seqs[:, :-2][after]).all()


def test_generator_follows_the_bigram_elsewhere(task):
    seqs = task.sample(np.random.default_rng(1), 400)
    prev, nxt = seqs[:, 1:-1].ravel(), seqs[:, 2:].ravel()
    plain = ~task.trigger_mask(prev)
    table = np.asarray(task.transition)
    assert (table[prev[plain], nxt[plain]] > 0).all()  # never a pair the bigram forbids
    for char in np.bincount(prev[plain]).argsort()[-5:]:  # the 5 most frequent non-trigger predecessors
        seen = np.bincount(nxt[plain][prev[plain] == char], minlength=table.shape[0]) / (prev[plain] == char).sum()
        assert 0.5 * np.abs(seen - table[char]).sum() < 0.08  # total variation from the bigram row


def test_vocabulary_and_tokenizer(task):
    assert len(task.chars) == 65 and task.triggers == (0, 1, 2)
    assert set(task.chars[:3]) == {" ", "e", "t"}
    tok = build_tokenizer(task)
    text = task.decode(task.sample(np.random.default_rng(2), 1)[0, 1:])
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok("<s>")["input_ids"] != [task.bos_id] and tok(BOS)["input_ids"] == [task.bos_id]


def test_training_writes_model_history_and_plots(trained):
    where, final = trained["softmax"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "history.json", "history.csv",
                 "dynamics.png", "heldout.jsonl", "testbed.json", "checkpoint/state.json"):
        assert (where / name).is_file(), name
    history = json.loads((where / "history.json").read_text())
    assert [row["step"] for row in history] == [0, 2, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert final["steps"] == 4 and 0 <= final["attn_sink"] <= 1
    for key in ("attn_sink", "value_norm_sink", "value_norm_others", "residual_norm_sink", "residual_norm_others"):
        assert np.isfinite(final[key])
    assert "attn_sink_L0H0" in (where / "history.csv").read_text().splitlines()[0]
    rows = [json.loads(line) for line in (where / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["text"]) == 31 for r in rows)


def test_resume_continues_the_same_run(tmp_path):
    config = dict(layers=1, attention="softmax", **TINY)
    train(TrainConfig(out=str(tmp_path / "a"), steps=2, **config))
    resumed = train(TrainConfig(out=str(tmp_path / "a"), steps=4, **config))
    straight = train(TrainConfig(out=str(tmp_path / "b"), steps=4, **config))
    assert resumed["loss"] == straight["loss"] and resumed["attn_sink"] == straight["attn_sink"]
    from quantsink.errors import QuantsinkError

    with pytest.raises(QuantsinkError, match="other settings"):
        train(TrainConfig(out=str(tmp_path / "a"), steps=6, **{**config, "attention": "relu"}))


@pytest.mark.parametrize("attention,implementation", [("softmax", "sdpa"), ("relu", "quantsink_relu")])
def test_model_dir_loads_through_quantsink(trained, attention, implementation):
    from quantsink.data.models import load_model

    where, _ = trained[attention]
    loaded = load_model(str(where), device="cpu")
    assert loaded.model.config._attn_implementation == implementation
    assert json.loads((where / "config.json").read_text())["quantsink_attention"] == attention
    ids = torch.tensor([[loaded.tokenizer.bos_token_id, *loaded.tokenizer("the cat ")["input_ids"]]])
    from transformers import OPTForCausalLM

    from quantsink.hooks.attention import register

    register()
    direct = OPTForCausalLM.from_pretrained(where, attn_implementation=implementation)
    torch.testing.assert_close(loaded.model(ids).logits, direct(ids).logits)


def test_relu_attention_is_registered_and_used(trained):
    from transformers import AttentionInterface

    from quantsink.hooks.attention import RELU
    from quantsink.data.models import load_model

    assert RELU in AttentionInterface._global_mapping
    model = load_model(str(trained["relu"][0]), device="cpu").model
    ids = torch.arange(10)[None]  # (1, T)
    out = model(ids, output_attentions=True)
    weights = out.attentions[0][0, 0]  # (T, T)
    layer = model.model.decoder.layers[0]
    h = layer.self_attn_layer_norm(model.model.decoder.embed_tokens(ids) + model.model.decoder.embed_positions(
        torch.ones_like(ids), position_ids=torch.arange(10)[None]))  # (1, T, C)
    scores = layer.self_attn.q_proj(h)[0] @ layer.self_attn.k_proj(h)[0].T / 32 ** 0.5  # (T, T)
    expected = torch.relu(scores).tril() / torch.arange(1, 11)[:, None]
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(weights.sum(-1), torch.ones(10))  # not a softmax


def test_stats_probes_read_relu_weights_not_a_softmax(trained):
    from quantsink.hooks import sites as hooks
    from quantsink.data.models import load_model

    model = load_model(str(trained["relu"][0]), device="cpu").model
    ids = torch.arange(10)[None]  # (1, T)
    seen = []
    with hooks.attach(model, {"layers.0.attn": hooks.Hook(lambda probs, row: seen.append(probs), "attention")}):
        out = model(ids, output_attentions=True)
    torch.testing.assert_close(seen[0], out.attentions[0].float())
    assert not torch.allclose(seen[0].sum(-1), torch.ones(10))


def test_act_quantizer_sees_flattened_tokens_as_sequences():
    from quantsink.schemes.simulated import ActQuantizer, KeepFp

    keep = KeepFp(lambda ids, offset: torch.zeros(ids.shape, dtype=torch.bool).index_fill(1, torch.tensor([0]), True))
    keep.hook((torch.zeros(2, 5, dtype=torch.long),), {})
    quant = ActQuantizer(8, True, "dynamic", "tensor", keep)
    x = torch.randn(2, 5, 8)
    x[:, 0] *= 1000  # a massive sink token, kept in full precision
    flat = quant(x.reshape(10, 8))
    torch.testing.assert_close(flat.reshape(2, 5, 8), quant(x))
    torch.testing.assert_close(flat.reshape(2, 5, 8)[:, 0], x[:, 0])
    assert (flat.reshape(2, 5, 8)[:, 1:] - x[:, 1:]).abs().max() < 0.05


def test_cli_train_json_and_bad_input(tmp_path):
    from quantsink.cli import app

    runner = CliRunner()
    args = ["testbed", "train", "--out", str(tmp_path / "m"), "--layers", "1", "--d", "16", "--seq-len", "16",
            "--steps", "2", "--batch", "2", "--eval-every", "1", "--probe-batch", "2", "--heldout", "2",
            "--precision", "float32", "--device", "cpu", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout)
    for key in ("attn_sink", "value_norm_sink", "value_norm_others", "residual_norm_sink", "residual_norm_others",
                "steps"):
        assert key in final
    assert final["steps"] == 2
    bad = runner.invoke(app, ["testbed", "train", "--out", str(tmp_path / "x"), "--attention", "relux"])
    assert bad.exit_code == 2 and "Did you mean 'relu'" in bad.output
    missing = runner.invoke(app, ["testbed", "train", "--steps", "1"])
    assert missing.exit_code == 2 and "--out" in missing.output


def test_quantsink_eval_on_a_trained_relu_model(trained, tmp_path):
    """--model DIR with its held-out corpus: schemes apply."""
    from quantsink import RunConfig
    from quantsink import run

    where = trained["relu"][0]
    record = run(RunConfig(model=str(where), corpus=f"file:{where}/heldout.jsonl", protocol="lm-eval", window=31,
                           max_tokens=62, calib_windows=1, calib_draws=1, stats_windows=2, scheme="w8a8", device="cpu",
                           results=str(tmp_path), offline=True)).to_dict()
    assert record["protocol"]["n_windows"] == 2 and record["protocol"]["scored_tokens"] == 62
    assert record["candidate"]["ppl"] > 1  # that the scores are ReLU attention's: test_attention_variants
