"""One way to touch the model: after any run nothing is left attached; calibration sees the mitigations;
metrics do not depend on whether statistics are collected.  Tiny Llama built from a config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantsink.hooks import probes, sites as hooks
from quantsink.config import RunConfig
from quantsink.errors import UsageError
from quantsink.mitigations import MITIGATIONS
from quantsink.pipeline.run import Session, build_candidate, candidate_pass, prepare, reference_pass
from quantsink.schemes import SCHEMES


def _no_progress(stage, total):
    return lambda n: None


@pytest.fixture(scope="module")
def session():
    return Session()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The conftest tiny Llama with hidden size 64: bitsandbytes' 4-bit CPU kernels need blocks of 64."""
    from conftest import train_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama-64")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    train_tiny_tokenizer(directory)
    return directory


def _config(tiny_model_dir, tiny_text_file, **fields) -> RunConfig:
    base = dict(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", window=32, max_tokens=64,
                calib_windows=1, stats_windows=1, device="cpu")
    return RunConfig(**{**base, **fields})


def _candidate(config, session):
    prep = prepare(config, session)
    reference, _ = reference_pass(prep, _no_progress)
    model, notes = build_candidate(prep)
    return prep, model, notes, candidate_pass(prep, model, reference, _no_progress)


def test_no_hooks_left_after_any_scheme_and_mitigation(tiny_model_dir, tiny_text_file, session):
    ran = 0
    for scheme in [*SCHEMES.names(), "kv8:kv_keys=post-rope"]:
        for mitigation in MITIGATIONS.names():
            config = _config(tiny_model_dir, tiny_text_file, scheme=scheme, mitigation=mitigation)
            try:
                prep, model, _, _ = _candidate(config, session)
            except UsageError:
                continue  # a combination the mitigation refuses, before anything is attached
            where = f"{scheme} + {mitigation}"
            assert hooks.attached_hooks(model) == 0 and hooks.attached_hooks(prep.loaded.model) == 0, where
            assert model.config._attn_implementation == prep.loaded.model.config._attn_implementation == "sdpa"
            assert not probes._PROBES, where
            ran += 1
    assert ran >= 50


def _ranges(model) -> dict[str, tuple[float, float]]:
    from quantsink.schemes.simulated import ActQuantizer, quantizers

    return {fqn: (float(q.lo), float(q.hi)) for fqn, q in quantizers(model, ActQuantizer).items()}


def test_static_ranges_are_observed_with_the_mitigations_attached(tiny_model_dir, tiny_text_file, session):
    """clip-residual scales the residual state after each block: the ranges of the Linears that read it
    (block 1 on) must change, those of block 0 (before any clip) must not."""
    ranges, notes = {}, {}
    for mitigation in ("none", "clip-residual:tau=0.5"):
        config = _config(tiny_model_dir, tiny_text_file, scheme="w8a8:w_bits=none", mitigation=mitigation,
                         stats=False)
        prep = prepare(config, session)
        model, notes[mitigation] = build_candidate(prep)
        ranges[mitigation] = _ranges(model)
        assert hooks.attached_hooks(model) == 0
    plain, clipped = ranges["none"], ranges["clip-residual:tau=0.5"]
    block0 = [f for f in plain if ".layers.0." in f]
    later = [f for f in plain if ".layers.0." not in f]
    assert block0 and later
    assert all(plain[f] == clipped[f] for f in block0)
    assert sum(plain[f] != clipped[f] for f in later) >= len(later) // 2
    assert "mitigation attached" in notes["clip-residual:tau=0.5"]["calibration"]["observed_in"]


@pytest.mark.parametrize("scheme", ["fp32", "w8a8", "kv4"])
def test_metrics_are_bitwise_the_same_with_and_without_stats(tiny_model_dir, tiny_text_file, session, scheme):
    from quantsink.pipeline.run import compare_passes as evaluate

    records = {stats: evaluate(_config(tiny_model_dir, tiny_text_file, scheme=scheme, stats=stats,
                                       stats_windows=2, max_tokens=96), session).to_dict()
               for stats in (True, False)}
    on, off = records[True], records[False]
    assert on["stats"]["candidate"]["layers"] and off["stats"] is None
    for side in ("reference", "candidate"):
        for key in ("ppl", "nll_per_window", "kl", "top1_agreement", "kl_per_window"):
            if off[side][key] is not None:
                assert on[side][key] == off[side][key], (side, key)
