"""mitigation_effect and d_sink: which passes they use, reuse from the store, and their numbers."""

import math

import pytest

from quantsink.config import RunConfig
from quantsink.effects import annotate, d_sink, mitigation_effect
from quantsink.errors import QuantsinkError
from quantsink.results import SCHEMA_VERSION
from quantsink.plan import run_id_for

N = [100, 120, 110, 90, 105]


def record(config, per_token, kl=0.1, n=N):
    nll = [p * k for p, k in zip(per_token, n)]
    total = sum(nll) / sum(n)
    cand = {"ppl": math.exp(total), "nll_per_token": total, "bits_per_byte": 1.0, "kl": kl, "top1_agreement": 0.9,
            "nll_per_window": nll, "scored_per_window": list(n), "kl_per_window": [kl * k for k in n]}
    return {"schema_version": SCHEMA_VERSION, "run_id": run_id_for(config, "m", "c"),
            "config": config.to_record(), "model": {"sha256": "m"}, "corpus": {"sha256": "c"},
            "protocol": {}, "scheme": {}, "reference": {"ppl": 5.0}, "candidate": cand}


LEVELS = {"none": [3.0, 3.2, 2.9, 3.1, 3.0], "sink-fp": [2.2, 2.3, 2.1, 2.4, 2.2],
          "intact-kv": [3.0, 3.2, 2.9, 3.1, 3.0]}


class Evaluator:
    def __init__(self):
        self.calls = []

    def __call__(self, config):
        self.calls.append(config.mitigation)
        return record(config, LEVELS[config.mitigation], kl=0.5 if config.mitigation == "none" else 0.2)


def test_sink_fp_run_gets_effect_and_d_sink_and_stores_the_unmitigated_pass(tmp_path):
    config = RunConfig(scheme="w8a8-dyn", mitigation="sink-fp", results=str(tmp_path))
    evaluate = Evaluator()
    rec = record(config, LEVELS["sink-fp"], kl=0.2)
    annotate(rec, config, evaluate, write=True)
    assert evaluate.calls == ["none"]  # sink-fp is this run; none evaluated once
    eff = rec["mitigation_effect"]
    assert eff["delta_ppl"] < 0 and eff["verdict"] == "helps" and eff["ci95"][1] < 0
    assert eff["delta_kl"] == pytest.approx(-0.3) and eff["baseline"]["mitigation"] == "none"
    assert rec["d_sink"]["nats_per_token"] == pytest.approx(
        sum(a * k for a, k in zip(LEVELS["none"], N)) / sum(N) - sum(a * k for a, k in zip(LEVELS["sink-fp"], N)) / sum(N))
    stored = list(tmp_path.glob("*.json"))
    assert len(stored) == 1  # the unmitigated pass, with its own d_sink
    # a second mitigation reuses both stored passes: none from the store, sink-fp not needed anew
    config2 = config.replace(mitigation="intact-kv")
    rec2 = record(config2, LEVELS["intact-kv"])
    evaluate2 = Evaluator()
    annotate(rec2, config2, evaluate2, write=True)
    assert evaluate2.calls == ["sink-fp"]  # none came from the store; sink-fp was this run's, not stored
    assert rec2["mitigation_effect"]["verdict"] == "inconclusive"
    assert rec2["mitigation_effect"]["delta_ppl"] == 0.0
    assert rec2["d_sink"]["nats_per_token"] == pytest.approx(rec["d_sink"]["nats_per_token"])


def test_weight_only_scheme_gets_no_d_sink(tmp_path):
    config = RunConfig(scheme="int8", mitigation="intact-kv", results=str(tmp_path))
    evaluate = Evaluator()
    rec = record(config, LEVELS["intact-kv"])
    annotate(rec, config, evaluate, write=False)
    assert evaluate.calls == ["none"] and "d_sink" not in rec and "mitigation_effect" in rec
    assert not list(tmp_path.glob("*.json"))  # write=False stores nothing


def test_unmitigated_activation_run_gets_d_sink_only(tmp_path):
    config = RunConfig(scheme="kv4", mitigation="none", results=str(tmp_path))
    evaluate = Evaluator()
    rec = record(config, LEVELS["none"])
    annotate(rec, config, evaluate, write=False)
    assert evaluate.calls == ["sink-fp"] and "mitigation_effect" not in rec and rec["d_sink"]["nats_per_token"] > 0


def test_stale_record_that_does_not_pair_is_recomputed(tmp_path):
    from quantsink.results import write_record

    config = RunConfig(scheme="w8a8-dyn", mitigation="intact-kv", results=str(tmp_path))
    write_record(record(config.replace(mitigation="none"), LEVELS["none"][:4], n=N[:4]), tmp_path)
    evaluate = Evaluator()
    annotate(record(config, LEVELS["intact-kv"]), config, evaluate, write=False)
    assert "none" in evaluate.calls


def test_effect_functions_refuse_nothing_silently():
    a = record(RunConfig(), LEVELS["none"])
    b = record(RunConfig(), LEVELS["none"][:4], n=N[:4])
    with pytest.raises(ValueError):
        mitigation_effect(a, b, seed=0)
    assert d_sink(a, a, seed=0)["nats_per_token"] == 0.0
    with pytest.raises(QuantsinkError):
        from quantsink.effects import _check_pairs

        _check_pairs(a, b)


def test_variant_passes_skip_lm_eval_and_reuse_plain_records(tmp_path):
    config = RunConfig(scheme="w8a8-dyn", mitigation="sink-fp", results=str(tmp_path),
                       lm_eval="python-docs", lm_eval_limit=2)
    seen = []

    def evaluate(variant):
        seen.append(variant)
        return record(variant, LEVELS[variant.mitigation])

    annotate(record(config, LEVELS["sink-fp"]), config, evaluate, write=True)
    assert [(v.mitigation, v.lm_eval, v.lm_eval_limit) for v in seen] == [("none", "", None)]
    # the stored unmitigated pass is the one a plain `--mitigation none` run (no lm-eval) would find
    plain = config.replace(mitigation="none", lm_eval="", lm_eval_limit=None)
    assert (tmp_path / f"{run_id_for(plain, 'm', 'c')}.json").is_file()
