"""Pure statistics with planted values (no model)."""

import math

import pytest
import torch

from quantsink.measure import stats as S


def test_planted_outlier_found_at_its_channel_and_position():
    torch.manual_seed(0)
    h = torch.randn(2, 16, 32)  # (B, T, C)
    h[1, 5, 7] = -100.0
    m = S.massive_activation(h)
    assert m["value"][1] == 100.0 and int(m["position"][1]) == 5 and int(m["channel"][1]) == 7
    assert float(m["value"][0]) < 10  # the other window keeps its own (small) maximum
    assert 0.3 < float(m["median_abs"][1]) < 1.2  # median |N(0,1)| ~ 0.67


def test_one_hot_attention_on_key_0_has_sink_score_1():
    probs = torch.zeros(1, 2, 6, 6)  # (B, H, T, T)
    probs[:, 0, :, 0] = 1.0  # head 0 parks everything on key 0
    probs[:, 1] = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]  # head 1: uniform causal
    score = S.sink_score(probs)
    assert score[0, 0] == 1.0
    assert float(score[0, 1]) == pytest.approx(sum(1 / (i + 1) for i in range(1, 6)) / 5)


def test_attention_on_a_key_set_and_dormancy():
    probs = torch.zeros(1, 1, 4, 4)
    probs[0, 0, :, 0] = 0.5
    probs[0, 0, 1:, 2] = 0.45  # query 0 cannot see key 2 anyway: only i >= 1 count
    probs[0, 0, 0, 1] = 0.5
    key_attn = S.key_attention(probs)  # (1, 1, 4)
    keys = torch.tensor([[True, False, True, False]])
    on = S.attention_on(key_attn, keys)
    assert float(on) == pytest.approx(0.95)


def test_dormancy_is_per_query():
    """Guo et al.: a query is dormant when its attention on the sink is >= 0.89; a head when half its queries are."""
    probs = torch.zeros(1, 2, 5, 5)  # (B, H, T, T)
    probs[0, 0, :, 0] = torch.tensor([1.0, 0.95, 0.9, 0.5, 0.3])  # head 0: queries 1, 2 dormant of 1..4
    probs[0, 1, :, 0] = 0.8  # head 1: mean 0.8, no query reaches 0.89
    share = S.dormant_queries(probs)  # (1, 2)
    assert share.tolist() == [[0.5, 0.0]]
    assert S.dormant(share).tolist() == [[True, False]]
    assert S.dormant_queries(probs, tau=0.92).tolist() == [[0.25, 0.0]]
    # the averaged criterion it replaces would call head 0 active (mean 0.66) like head 1 (0.8)
    assert float(S.sink_score(probs)[0, 0]) < 0.89


def test_massive_tokens_follow_sun_et_al():
    """One value > 100 and >= 1000x the median |h|; the norm ratio alone misses a BOS like gemma3's."""
    torch.manual_seed(0)
    h = torch.randn(1, 64, 640) * 20  # median |h| ~ 13.5, token norms ~ 500
    h[0, 0, 3] = 30_000.0  # gemma3-like BOS: one huge value (norm ratio ~ 60, > 1000x the median)
    h[0, 9, 5] = 5_000.0  # large, but < 1000x the median
    m = S.massive_activation(h)
    assert m["tokens"][0].nonzero()[:, 0].tolist() == [0]
    norms = S.token_norms(h)[None]  # (L=1, B, T)
    assert not S.extreme_tokens(norms, k=100)[0, 0]  # the norm criterion alone misses it
    small = torch.full((1, 4), 50.0)
    assert not S.massive_tokens(small, torch.tensor([0.01])).any()  # 5000x the median but not > 100
    # gemma3's early layers: every token carries a value ~1000x the median |h|; only one that stands out counts
    every = torch.full((1, 64), 1_200.0)
    every[0, 0] = 24_000.0
    assert S.massive_tokens(every, torch.tensor([1.0])).nonzero()[:, 1].tolist() == [0]


def test_peak_ratio_and_extreme_tokens():
    norms = torch.tensor([[100.0, 1.0, 2.0, 1.0, 3.0]])  # (B, T)
    assert float(S.peak_ratio(norms)[0]) == pytest.approx(100 / 1.0)  # median of [1, 2, 1, 3] = 1 (lower)
    layers = torch.ones(3, 1, 8)  # (L, B, T)
    layers[2, 0, 3] = 60.0  # extreme only in the last layer, at position 3
    layers[1, 0, 0] = 40.0  # below k x median
    assert S.extreme_tokens(layers, k=50).tolist() == [[False, False, False, True] + [False] * 4]
    assert S.extreme_tokens(layers, k=30)[0, 0]


def test_value_drain_per_kv_head():
    v = torch.ones(1, 5, 2, 4)  # (B, T, KVH, D): every ||v_i|| = 2
    v[0, 0, 0] = 0.1  # KV head 0 drains token 0's value
    drain = S.value_drain(v)
    assert float(drain[0, 0]) == pytest.approx(0.1) and float(drain[0, 1]) == pytest.approx(1.0)


def test_kurtosis_of_gaussian_and_merged_batches():
    torch.manual_seed(0)
    x = torch.randn(400_000) * 3 + 0.5
    assert S.kurtosis(S.moments(x)) == pytest.approx(3.0, abs=0.05)
    merged = S.moments(x[:150_000]) + S.moments(x[150_000:])
    assert S.kurtosis(merged) == pytest.approx(S.kurtosis(S.moments(x)), rel=1e-5)
    spiky = torch.zeros(10_000)
    spiky[0] = 1.0
    direct = float(((spiky - spiky.mean()) ** 4).mean() / spiky.var(unbiased=False) ** 2)
    assert S.kurtosis(S.moments(spiky)) == pytest.approx(direct, rel=1e-4)
    assert math.isnan(S.kurtosis(S.moments(torch.ones(10))))


def test_absmax_without_extreme_tokens():
    x = torch.ones(1, 4, 3)
    x[0, 0, 1] = -500.0
    x[0, 2, 2] = 7.0
    tok = S.token_absmax(x)
    assert tok.tolist() == [[500.0, 1.0, 7.0, 1.0]]
    assert S.absmax_without(tok, torch.tensor([[True, False, False, False]])) == 7.0
    assert math.isnan(S.absmax_without(tok, torch.ones(1, 4, dtype=torch.bool)))


def _window_stats(sink: float, drain: float, peak: float, w: int = 2) -> S.WindowStats:
    L, H, KVH = 2, 3, 1
    massive = {"value": torch.full((w, L), peak * 10), "position": torch.zeros(w, L, dtype=torch.long),
               "channel": torch.full((w, L), 7), "median_abs": torch.full((w, L), 0.5)}
    sinks = torch.full((w, L, H), 0.2)
    sinks[:, 1, 0] = sink  # the head under test: L1H0
    return S.WindowStats(norm_sink=torch.full((w, L), peak), norm_median=torch.ones(w, L), massive=massive,
                         extreme=[[0]] * w, sink=sinks, extreme_attn=sinks,
                         dormant_queries=(sinks >= 0.89).float(),
                         drain=torch.full((w, L, KVH), drain), linear={
                             "layers.0.mlp.down_proj.in": {"absmax": 9.0, "absmax_without_extreme": 2.0,
                                                           "moments": S.moments(torch.randn(1000))}})


def test_summarize_layer_profile_and_heads():
    out = S.summarize(_window_stats(sink=0.95, drain=0.2, peak=80.0), k=50, tau=0.9, share=0.6,
                      sink_positions=())
    layer = out["layers"][1]
    assert layer["residual_peak_ratio"] == 80.0 and layer["massive_channel"] == 7
    assert layer["massive_ratio"] == 1600.0 and layer["dormant_heads"] == 1 and layer["value_drain"] == 0.2
    assert out["heads"]["dormant_fraction"][1] == [1.0, 0.0, 0.0]
    assert out["extreme_tokens"]["windows_with_position"] == {"0": 2}
    absmax, without, kurt = out["linear_inputs"]["sites"]["layers.0.mlp.down_proj.in"]
    assert (absmax, without) == (9.0, 2.0) and 2 < kurt < 4
    assert out["protocol"]["k"] == 50 and out["protocol"]["tau"] == 0.9 and out["protocol"]["dormant_queries"] == 0.6
    assert layer["massive_token"] and out["extreme_tokens"]["massive_value"] == 100.0


def test_changes_reports_woken_heads_and_largest_shifts():
    ref = S.summarize(_window_stats(sink=0.95, drain=0.2, peak=80.0))
    cand = S.summarize(_window_stats(sink=0.40, drain=0.9, peak=8.0), sink_positions=(0,))
    diff = S.changes(ref, cand)
    assert diff["woken"] == ["L1H0"] and diff["put_to_sleep"] == []
    assert diff["sink_shifts"][0] == {"head": "L1H0", "reference": 0.95, "candidate": 0.4, "delta": -0.55}
    assert diff["drain_shifts"][0]["delta"] == pytest.approx(0.7)
    assert diff["peak_shifts"][0]["reference"] == 80.0 and diff["peak_shifts"][0]["candidate"] == 8.0
    assert diff["position_offset"] == 1
    back = S.changes(cand, ref)
    assert back["put_to_sleep"] == ["L1H0"] and back["woken"] == []
    same = S.changes(ref, ref)
    assert same["woken"] == same["put_to_sleep"] == [] and same["mean_abs_sink_shift"] == 0.0


def test_domain_dependence_ranks_the_head_that_differs():
    prose = S.summarize(_window_stats(sink=0.95, drain=0.2, peak=80.0))
    code = S.summarize(_window_stats(sink=0.50, drain=0.2, peak=80.0))
    found = S.domain_dependence(prose, code, top=3)
    ranked = found["heads"]
    assert ranked[0]["head"] == "L1H0" and ranked[0]["delta"] == pytest.approx(-0.45)
    assert (ranked[0]["dormant_a"], ranked[0]["dormant_b"]) == (1.0, 0.0)
    assert ranked[1]["delta"] == 0.0 and len(ranked) == 3
    assert found["dormant_only_a"] == ["L1H0"] and found["dormant_only_b"] == []


def _fractions(per_window, share=0.5):
    """A stats summary stand-in holding one head's per-window dormant fractions (W windows, 1 layer, 1 head)."""
    mean = sum(per_window) / len(per_window)
    return {"protocol": {"dormant_queries": share},
            "heads": {"dormant_fraction": [[mean]], "dormant_per_window": [[[x]] for x in per_window]}}


def test_a_head_counts_as_woken_only_when_both_intervals_clear_the_threshold():
    clear = S.dormancy_shifts(_fractions([0.9, 0.85, 0.95, 0.9]), _fractions([0.1, 0.2, 0.15, 0.1]))
    assert clear[0]["counted"] == "woken" and clear[0]["shift_ci95"][1] < 0
    assert S._dormancy_flips(_fractions([0.9, 0.85, 0.95, 0.9]), _fractions([0.1, 0.2, 0.15, 0.1])) == (["L0H0"], [])
    # L25H3-like: 0.508 -> 0.484, windows spread around the threshold: a crossing, not counted
    near = S.dormancy_shifts(_fractions([0.45, 0.57, 0.49, 0.522]), _fractions([0.43, 0.55, 0.46, 0.496]))
    assert (near[0]["reference"], near[0]["candidate"]) == (0.508, 0.484) and near[0]["counted"] is None
    assert near[0]["reference_ci95"][0] < 0.5 < near[0]["reference_ci95"][1]
    assert S._dormancy_flips(_fractions([0.45, 0.57, 0.49, 0.522]), _fractions([0.43, 0.55, 0.46, 0.496])) == ([], [])
    back = S.dormancy_shifts(_fractions([0.1, 0.2, 0.15, 0.1]), _fractions([0.9, 0.85, 0.95, 0.9]))
    assert back[0]["counted"] == "put_to_sleep"
    assert S.dormancy_shifts({"heads": {}}, _fractions([0.1])) is None  # a side without per-window fractions


def test_summaries_keep_per_window_dormant_fractions():
    out = S.summarize(_window_stats(sink=0.95, drain=0.2, peak=80.0))
    per_window = out["heads"]["dormant_per_window"]
    assert len(per_window) == 2 and per_window[0][1] == out["heads"]["dormant_fraction"][1]
