"""mitigation_effect and d_sink: which passes they use, reuse from the store, and their numbers."""

import math

import pytest

from quantsink.config import RunConfig
from quantsink.effects import annotate, d_sink, mitigation_effect
from quantsink.errors import QuantsinkError
from quantsink.results import SCHEMA_VERSION
from quantsink.plan import run_id_for

N = [100, 120, 110, 90, 105, 95, 115, 100]  # 8 windows: the default min_windows


def record(config, per_token, kl=0.1, n=N):
    nll = [p * k for p, k in zip(per_token, n)]
    total = sum(nll) / sum(n)
    cand = {"ppl": math.exp(total), "nll_per_token": total, "bits_per_byte": 1.0, "kl": kl, "top1_agreement": 0.9,
            "nll_per_window": nll, "scored_per_window": list(n), "kl_per_window": [kl * k for k in n]}
    return {"schema_version": SCHEMA_VERSION, "run_id": run_id_for(config, "m", "c"),
            "config": config.to_record(), "model": {"sha256": "m"}, "corpus": {"sha256": "c"},
            "protocol": {}, "scheme": {}, "reference": {"ppl": 5.0}, "candidate": cand}


LEVELS = {"none": [3.0, 3.2, 2.9, 3.1, 3.0, 3.1, 2.9, 3.0], "sink-fp": [2.2, 2.3, 2.1, 2.4, 2.2, 2.3, 2.2, 2.1],
          "intact-kv": [3.0, 3.2, 2.9, 3.1, 3.0, 3.1, 2.9, 3.0]}


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
        mitigation_effect(a, b)
    assert d_sink(a, a)["nats_per_token"] == 0.0
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


def test_noise_floor_of_the_unmitigated_run_gates_the_verdict():
    base, mitigated = record(RunConfig(), LEVELS["none"]), record(RunConfig(), LEVELS["sink-fp"])
    assert mitigation_effect(base, mitigated)["verdict"] == "helps"
    base["noise_floor"] = {"nats_per_token": 1.0}  # float noise as large as the effect
    eff = mitigation_effect(base, mitigated)
    assert eff["verdict"] == "inconclusive" and eff["noise_floor_nats"] == 1.0 and eff["noise_floor_measured"]
    assert eff["noise_floor_ppl"] == pytest.approx(base["candidate"]["ppl"] * (math.e - 1))


def test_too_few_windows_is_insufficient_data_stated_in_the_record():
    base, mitigated = record(RunConfig(), LEVELS["none"]), record(RunConfig(), LEVELS["sink-fp"])
    eff = mitigation_effect(base, mitigated, min_windows=9)
    assert eff["verdict"] == "insufficient-data" and eff["min_windows"] == 9 and eff["n_windows"] == 8


def test_a_mitigation_that_changed_nothing_is_not_applicable():
    base = record(RunConfig(), LEVELS["none"])
    same = record(RunConfig(mitigation="smooth"), LEVELS["none"])
    assert mitigation_effect(base, same)["verdict"] == "not-applicable"
    noop = record(RunConfig(mitigation="sink-token"), LEVELS["sink-fp"])  # numbers aside: it says it did nothing
    noop["mitigation"] = [{"name": "sink-token", "applied": {"applied": False, "why": "no-op: BOS already there"}}]
    eff = mitigation_effect(base, noop)
    assert eff["verdict"] == "not-applicable" and "BOS" in eff["not_applicable"]


def test_a_bos_sink_is_recorded_as_shared_by_all_windows():
    base, other = record(RunConfig(), LEVELS["none"]), record(RunConfig(), LEVELS["sink-fp"])
    assert mitigation_effect(base, other)["shared_sink"] is None  # no BOS: every window has its own first token
    for rec in (base, other):
        rec["protocol"] = {"bos_token_id": 2}
    assert "shared by all windows" in mitigation_effect(base, other)["shared_sink"]
    assert "id 2" in d_sink(base, other)["shared_sink"]
