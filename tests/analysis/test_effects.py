"""The planner puts the variant runs effects pair with into every plan; effects are pure functions of
stored records (their numbers, which records they pair, what they refuse)."""

import dataclasses
import math

import pytest

from quantsink.config import RunConfig
from quantsink.analysis.effects import Effects, d_sink, effects, mitigation_effect, variant_id
from quantsink.errors import QuantsinkError
from quantsink.pipeline.plan import Planner, plan, variants
from synthetic_records import make_record

N = [100, 120, 110, 90, 105, 95, 115, 100]  # 8 windows: the default min_windows
LEVELS = {"none": [3.0, 3.2, 2.9, 3.1, 3.0, 3.1, 2.9, 3.0], "sink-fp": [2.2, 2.3, 2.1, 2.4, 2.2, 2.3, 2.2, 2.1],
          "intact-kv": [3.0, 3.2, 2.9, 3.1, 3.0, 3.1, 2.9, 3.0], "smooth": [3.0, 3.1, 2.9, 3.1, 3.0, 3.2, 2.9, 3.0]}


def record(scheme: str, mitigation: str, per_token=None, kl: float = 0.1, n=N, **config):
    """A synthetic record whose candidate has the given per-token NLL in each window."""
    per_token = per_token or LEVELS[mitigation]
    base = make_record(scheme=scheme, mitigation=mitigation)
    base = dataclasses.replace(base, config=base.config.replace(**config)) if config else base
    nll = [p * k for p, k in zip(per_token, n)]
    total = sum(nll) / sum(n)
    cand = dataclasses.replace(base.candidate, ppl=math.exp(total), nll_per_token=total, nll_per_window=nll,
                               scored_per_window=list(n), kl=kl, kl_per_window=[kl * k for k in n])
    return dataclasses.replace(base, candidate=cand)


def store(*records):
    by_id = {r.run_id: r for r in records}
    return by_id.get


def test_variants_are_what_the_effects_need():
    assert variants(RunConfig(scheme="int8")) == ()
    assert variants(RunConfig(scheme="int8", mitigation="intact-kv")) == ("none",)
    assert variants(RunConfig(scheme="w8a8-dyn")) == ("sink-fp",)
    assert variants(RunConfig(scheme="w8a8-dyn", mitigation="sink-fp")) == ("none",)
    assert variants(RunConfig(scheme="kv4", mitigation="smooth")) == ("none", "sink-fp")


def test_plan_puts_variants_first_once_and_marks_them():
    fake = Planner(run_id=lambda c: f"{c.scheme}|{c.mitigation}|{c.lm_eval}")
    planned = plan([RunConfig(scheme="w8a8", mitigation="smooth", lm_eval="python-docs"),
                    RunConfig(scheme="w8a8", mitigation="none")], fake, fresh=True)
    assert [(p.config.mitigation, p.variant, p.fresh) for p in planned] == [
        ("none", False, True), ("sink-fp", True, False), ("smooth", False, True)]
    assert planned[1].config.lm_eval == "" and planned[2].config.lm_eval == "python-docs"  # variants: no lm-eval
    assert [p.index for p in planned] == [0, 1, 2]


def test_mitigation_effect_and_d_sink_from_stored_records():
    mitigated, none, fp = (record("w8a8-dyn", m) for m in ("intact-kv", "none", "sink-fp"))
    found = effects(mitigated, store(none, fp))
    eff = found.mitigation_effect
    assert eff["baseline"]["run_id"] == none.run_id and eff["delta_ppl"] == 0.0 and eff["verdict"] == "not-applicable"
    per_token = {m: sum(a * k for a, k in zip(LEVELS[m], N)) / sum(N) for m in ("none", "sink-fp")}
    assert found.d_sink["nats_per_token"] == pytest.approx(per_token["none"] - per_token["sink-fp"])
    assert found.d_sink["sink_fp_run_id"] == fp.run_id and found.missing == ()
    helps = effects(fp, store(none)).mitigation_effect  # sink-fp is its own d_sink side
    assert helps["verdict"] == "helps" and helps["ci95"][1] < 0


def test_variant_ids_are_the_planned_ids():
    mitigated = record("w8a8-dyn", "intact-kv")
    assert variant_id(mitigated, "none") == record("w8a8-dyn", "none").run_id
    assert variant_id(mitigated, "intact-kv") == mitigated.run_id
    with_lm_eval = record("w8a8-dyn", "intact-kv", lm_eval="python-docs")
    assert variant_id(with_lm_eval, "none") == variant_id(mitigated, "none")  # a variant runs without lm-eval


def test_missing_variants_leave_effects_empty_and_named():
    lonely = record("kv4", "smooth")
    found = effects(lonely, store())
    assert found == Effects(None, None, (variant_id(lonely, "none"), variant_id(lonely, "sink-fp")))
    assert effects(record("int8", "none"), store()) == Effects()  # weight-only, unmitigated: nothing to pair


def test_runs_that_do_not_pair_are_refused():
    mitigated = record("w8a8-dyn", "intact-kv")
    stale = record("w8a8-dyn", "none", LEVELS["none"][:4], n=N[:4])
    with pytest.raises(QuantsinkError, match="cannot be paired"):
        effects(mitigated, store(stale))
    with pytest.raises(ValueError):
        mitigation_effect(stale, mitigated)
    assert d_sink(mitigated, mitigated)["nats_per_token"] == 0.0


def test_noise_floor_of_the_unmitigated_run_gates_the_verdict():
    base, mitigated = record("w8a8-dyn", "none"), record("w8a8-dyn", "sink-fp")
    assert mitigation_effect(base, mitigated)["verdict"] == "helps"
    base = dataclasses.replace(base, noise_floor={"nats_per_token": 1.0})  # float noise as large as the effect
    eff = mitigation_effect(base, mitigated)
    assert eff["verdict"] == "within-noise" and eff["noise_floor_nats"] == 1.0 and eff["noise_floor_measured"]
    assert eff["noise_floor_ppl"] == pytest.approx(base.candidate.ppl * (math.e - 1))


def test_too_few_windows_is_insufficient_data_stated_in_the_record():
    base, mitigated = record("w8a8-dyn", "none"), record("w8a8-dyn", "sink-fp")
    eff = mitigation_effect(base, mitigated, min_windows=9)
    assert eff["verdict"] == "insufficient-data" and eff["min_windows"] == 9 and eff["n_windows"] == 8


def test_a_mitigation_that_changed_nothing_is_not_applicable():
    base = record("w8a8-dyn", "none")
    same = record("w8a8-dyn", "smooth", LEVELS["none"])
    assert mitigation_effect(base, same)["verdict"] == "not-applicable"
    noop = record("w8a8-dyn", "sink-token", LEVELS["sink-fp"])  # numbers aside: it says it did nothing
    said = dataclasses.replace(noop.mitigation[0], applied={"applied": False, "why": "no-op: BOS already there"})
    eff = mitigation_effect(base, dataclasses.replace(noop, mitigation=(said,)))
    assert eff["verdict"] == "not-applicable" and "BOS" in eff["not_applicable"]


def test_a_bos_sink_is_recorded_as_shared_by_all_windows():
    base, other = record("w8a8-dyn", "none"), record("w8a8-dyn", "sink-fp")
    assert mitigation_effect(base, other)["shared_sink"] is None  # no BOS: every window has its own first token
    base, other = (dataclasses.replace(r, protocol=dataclasses.replace(r.protocol, bos_token_id=2))
                   for r in (base, other))
    assert "shared by all windows" in mitigation_effect(base, other)["shared_sink"]
    assert "id 2" in d_sink(base, other)["shared_sink"]


def _in_documents(rec, docs):
    return dataclasses.replace(rec, protocol=dataclasses.replace(rec.protocol, kind="documents",
                                                                  documents=len(set(docs)), window_documents=docs))


def test_windows_of_one_document_are_one_cluster():
    base, mitigated = record("w8a8-dyn", "none"), record("w8a8-dyn", "smooth")
    plain = mitigation_effect(base, mitigated)
    docs = [0, 0, 1, 1, 2, 2, 3, 3]
    clustered = mitigation_effect(_in_documents(base, docs), _in_documents(mitigated, docs))
    assert plain["n_documents"] is None and clustered["n_documents"] == 4
    assert clustered["delta_ppl"] == pytest.approx(plain["delta_ppl"])
    assert "clustered by document" in clustered["method"]
    assert clustered["baseline"]["ppl_ci95"][0] < base.candidate.ppl < clustered["baseline"]["ppl_ci95"][1]


def test_inconclusive_nll_with_a_clearly_lower_kl_reads_lowers_kl_and_states_the_mde():
    base, mitigated = record("w8a8-dyn", "none"), record("w8a8-dyn", "smooth", kl=0.1)
    eff = mitigation_effect(base, mitigated)
    assert eff["verdict"] == "inconclusive" and 0 < eff["mde_nats"] < math.inf and eff["mde_ppl"] < 0
    rng = [0.04, 0.05, 0.045, 0.05, 0.04, 0.05, 0.045, 0.05]
    cand = dataclasses.replace(mitigated.candidate, kl_per_window=[k * x for k, x in zip(N, rng)])
    eff = mitigation_effect(base, dataclasses.replace(mitigated, candidate=cand))
    assert eff["nll_verdict"] == "inconclusive" and eff["kl_verdict"] == "helps" and eff["verdict"] == "lowers-kl"
    assert eff["delta_kl_ci95"][1] < 0


def _with_draws(rec, *levels):
    draws = [{"nll_per_window": [p * k for p, k in zip(level, N)], "kl_per_window": None, "top1_per_window": None}
             for level in levels]
    return dataclasses.replace(rec, calibration={"windows": 4, "scored_windows": [0, 8], "draws": draws})


def test_the_calibration_spread_widens_a_static_schemes_interval():
    base, mitigated = record("w8a8", "none"), record("w8a8", "sink-fp")
    alone = mitigation_effect(base, mitigated)
    same = mitigation_effect(_with_draws(base, LEVELS["none"]), _with_draws(mitigated, LEVELS["sink-fp"]))
    assert same["calibration_deltas"] == pytest.approx([alone["delta_nll_per_token"]] * 2)
    assert same["calibration_sd_nats"] == pytest.approx(0.0, abs=1e-12)
    assert same["ci95"] == pytest.approx(alone["ci95"]) and same["verdict"] == "helps"
    # on the second draw the mitigation does nothing: the effect's spread over draws widens the interval
    differ = mitigation_effect(_with_draws(base, LEVELS["none"]), _with_draws(mitigated, LEVELS["none"]))
    deltas = differ["calibration_deltas"]
    assert deltas[1] == pytest.approx(0.0, abs=1e-12) and differ["calibration_sd_nats"] == pytest.approx(
        abs(deltas[0]) / math.sqrt(2))
    assert differ["verdict"] == "inconclusive" and differ["delta_ppl"] == alone["delta_ppl"]
    assert mitigation_effect(base, mitigated)["calibration_deltas"] is None  # no draws recorded
