"""``quantsink compare`` and ``quantsink explain``: synthetic records (through the schema), a tiny model, smollm2."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from quantsink.analysis import explain as E
from quantsink.cli import app
from quantsink.analysis.compare import compare, resolve
from quantsink.errors import UsageError
from quantsink.records.store import write_record
from synthetic_records import make_record, write_grid

runner = CliRunner()


def _pick(records, model="tiny-llama", corpus="python-docs", scheme="w8a8", mitigation="none"):
    return next(r for r in records if (r.model.name, r.corpus.name, r.config.scheme, r.config.mitigation)
                == (model, corpus, scheme, mitigation))


def test_compare_pairs_windows_and_gives_the_verdict(tmp_path):
    records = write_grid(tmp_path)
    a, b = _pick(records), _pick(records, mitigation="sink-fp")
    result = compare(a, b)
    assert result["paired"]["verdict"] == "helps"  # sink-fp: ppl 25 -> 13 on every window
    assert result["paired"]["delta_ppl"] == pytest.approx(-12.0)
    assert len(result["per_window"]) == a.protocol.n_windows
    assert result["moved"]["drain_shifts"]  # statistics that moved, largest first
    shifts = [abs(s["delta"]) for s in result["moved"]["drain_shifts"]]
    assert shifts == sorted(shifts, reverse=True)


def test_compare_notes_runs_scored_by_different_evaluators(tmp_path):
    records = write_grid(tmp_path)
    a, b = _pick(records), _pick(records, mitigation="sink-fp")
    assert compare(a, b)["evaluator_note"] is None
    old = dataclasses.replace(a, protocol=dataclasses.replace(a.protocol, evaluator_version="2"))
    note = compare(old, b)["evaluator_note"]
    assert note.startswith(f"A was scored by evaluator 2, B by evaluator {b.protocol.evaluator_version}")


def test_compare_cli_resolves_specs_and_ids(tmp_path):
    records = write_grid(tmp_path)
    narrow = ["--results", str(tmp_path), "--model", "tiny-llama", "--corpus", "python-docs"]
    result = runner.invoke(app, ["compare", "w8a8", "W8A8+sink-fp", *narrow, "--json"], terminal_width=200)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["a"]["run_id"], data["b"]["run_id"]) == (_pick(records).run_id,
                                                          _pick(records, mitigation="sink-fp").run_id)
    smooth = _pick(records, mitigation="smooth")
    text = runner.invoke(app, ["compare", _pick(records).run_id, str(tmp_path / f"{smooth.run_id}.json"),
                               "--results", str(tmp_path)], terminal_width=200)
    assert text.exit_code == 0, text.output
    assert "verdict inconclusive" in text.output and "KL" in text.output


def test_compare_refuses_other_windows_in_one_line(tmp_path):
    records = write_grid(tmp_path)
    a, b = _pick(records), _pick(records, corpus="python-code")
    result = runner.invoke(app, ["compare", a.run_id, b.run_id, "--results", str(tmp_path)], terminal_width=300)
    assert result.exit_code == 2
    assert "did not score the same windows" in result.output and len(result.output.strip().splitlines()) == 1
    ambiguous = runner.invoke(app, ["compare", "w8a8", "int8", "--results", str(tmp_path)], terminal_width=300)
    assert ambiguous.exit_code == 2 and "--model / --corpus" in ambiguous.output
    with pytest.raises(UsageError, match="no record of"):
        resolve("nf4+sink-fp", tmp_path)


def _with_sites(record):
    """The record with per-site ranges: layer 3's down_proj input set by the sink (3000 vs 17)."""
    sites = {f"layers.{l}.mlp.down_proj.in": [3000.0 if l == 3 else 20.0, 17.0 if l == 3 else 19.0, 40.0]
             for l in range(6)}
    ref = {**record.stats.reference, "linear_inputs": {"columns": ["absmax", "absmax_without_extreme", "kurtosis"],
                                                       "sites": sites}}
    return dataclasses.replace(record, stats=dataclasses.replace(record.stats, reference=ref))


def test_explain_sites_find_where_the_sink_sets_the_scale():
    view = E.explain_record(_with_sites(make_record(scheme="w8a8")))
    sites = view["sites"]
    assert sites["set_by_sink"] == ["layers.3.mlp.down_proj.in"]
    top = sites["rows"][0]
    assert top["step"] == pytest.approx(3000 / 127) and top["step_without_extreme"] == pytest.approx(17 / 127)
    assert "1 of 6 quantized sites" in view["summary"]
    per_token = E.explain_record(_with_sites(make_record(scheme="w8a8-tok")))
    assert per_token["sites"]["set_by_sink"] == [] and "per-token" in per_token["summary"].lower()


def test_explain_cli_record_only(tmp_path):
    record = _with_sites(_pick(write_grid(tmp_path)))
    write_record(record, tmp_path)
    plot = tmp_path / "explain.png"
    result = runner.invoke(app, ["explain", record.run_id, "--results", str(tmp_path), "--record-only", "--json",
                                 "--plot", str(plot)], terminal_width=200)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["sites"]["set_by_sink"] == ["layers.3.mlp.down_proj.in"]
    assert data["d_sink"]["nats_per_token"] > 0  # from the stored none / sink-fp variant runs
    assert plot.read_bytes()[:4] == b"\x89PNG"
    refused = runner.invoke(app, ["explain", "--record-only"], terminal_width=200)
    assert refused.exit_code == 2 and "needs a stored RUN" in refused.output


def test_position_and_layer_views_are_exact_sums():
    positions, ref = [1, 2, 40, 1, 2, 40], [1.0] * 6
    full, kept = [3.0, 2.0, 1.5, 3.0, 2.0, 1.5], [1.5, 1.5, 1.0, 1.5, 1.5, 1.0]
    view = E.position_view(positions, ref, full, kept)
    assert [b["positions"] for b in view["buckets"]] == ["1-4", "33+"]
    assert view["buckets"][0]["increase"] == pytest.approx(1.5)
    assert view["recovered"] == pytest.approx((7 / 6 - 1 / 3) / (7 / 6))
    rows = E.layer_view([6.5, 6.5], {0: [5.0, 5.1], 1: [6.5, 6.5]}, [3, 3], whole=1.0)
    assert rows[0]["d_sink"] == pytest.approx((1.5 + 1.4) / 6) and rows[1]["d_sink"] == 0


def test_explain_measures_on_a_tiny_model(tiny_model_dir, tiny_text_file):
    from quantsink.config import RunConfig

    config = RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", scheme="w8a8:w_bits=none",
                       window=32, max_tokens=256, calib_windows=2, stats_windows=2, offline=True)
    data = E.measure(config, [0, 1])
    view = E.explain_measured(config, E.scheme_record(config), data)
    n = sum(len(v) for v in [data["ref"]])
    assert len(data["full"]) == len(data["kept"]) == n == len(data["positions"])
    assert [r["layer"] for r in view["layers"]] == [0, 1]
    assert view["sites"]["rows"] and view["positions"]["buckets"]
    same = E.measure(config, [])  # same inputs, same numbers
    assert same["full"] == data["full"] and same["kept"] == data["kept"]
    assert data["full"] != data["kept"]  # keeping the sink changes the candidate


def test_explain_scores_with_evals_scorer(tiny_model_dir, tiny_text_file, tmp_path):
    """explain's per-token NLLs summed per window are eval's per-window NLLs for the same run
    (reference and candidate): one scorer, not a second scoring loop."""
    from quantsink import run
    from quantsink.config import RunConfig

    config = RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", scheme="w8a8:w_bits=none",
                       window=32, max_tokens=256, calib_windows=2, stats_windows=2, offline=True,
                       noise_floor=False, results=str(tmp_path))
    record = run(config).to_dict()
    data = E.measure(config, [])
    for side, key in (("reference", "ref"), ("candidate", "full")):
        sums = E.window_sums(data[key], data["windows"], data["n_windows"])
        assert [round(x, 6) for x in sums] == pytest.approx(record[side]["nll_per_window"], abs=2e-6), side


@pytest.mark.slow
def test_explain_smollm2_w8a8(tmp_path):
    plot = tmp_path / "explain.png"
    result = runner.invoke(app, ["explain", "--scheme", "w8a8", "--max-tokens", "512", "--window", "128",
                                 "--calib-windows", "2", "--layers", "0,15", "--json", "--plot", str(plot)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["sites"]["set_by_sink"], "smollm2's sink sets static per-tensor scales"
    assert data["d_sink"]["nats_per_token"] > 0 and data["positions"]["recovered"] > 0
    assert plot.is_file()


def test_explain_never_says_the_sink_sets_the_scale_when_d_sink_is_about_zero():
    sites = {"note": None, "set_by_sink": ["layers.1.mlp.down_proj.in"],
             "rows": [{"site": "layers.1.mlp.down_proj.in", "absmax": 3000.0, "absmax_without_extreme": 17.0,
                       "ratio": 176.0, "bits_lost": 7.5}]}
    zero = {"nats_per_token": 0.002, "ci95": [-0.01, 0.014]}
    clear = {"nats_per_token": 0.6, "ci95": [0.5, 0.7]}
    assert "does not measurably set" in E.summary({"sites": sites, "d_sink": zero})
    assert "is set by the extreme tokens" in E.summary({"sites": sites, "d_sink": clear})
    assert "is set by the extreme tokens" in E.summary({"sites": sites})
