"""The engine branch of a run, without llama.cpp: the shared evaluator on given logits, run identity, refusals."""

from __future__ import annotations

import pytest
import torch

from quantsink.config import RunConfig
from quantsink.data.models import check_model_spec, gguf_path
from quantsink.data.windows import Windows
from quantsink.errors import UsageError
from quantsink.measure.passes import score_logits, window_ids
from quantsink.pipeline.engine import engine_plan
from quantsink.pipeline.plan import identity, variants


def _windows() -> Windows:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 8))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # a right-padded window
    scored = mask.bool().clone()
    scored[:, 0] = False
    return Windows(ids, mask, scored, torch.tensor([10, 10, 10]))


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1)[:-1].sum())  # the last row predicts nothing scored


def test_score_logits_is_exact_kl_nll_and_top1_per_window():
    windows = _windows()
    assert [len(w) for w in window_ids(windows)] == [8, 8, 6]
    ref = [torch.randn(len(w), 50) for w in window_ids(windows)]
    cand = [z + 0.3 * torch.randn_like(z) for z in ref]
    result = score_logits(cand, windows, reference=ref)
    assert float(result.kl.sum()) == pytest.approx(sum(_kl(p, q) for p, q in zip(ref, cand)), rel=1e-6)
    nll = -sum(float(torch.log_softmax(z.double(), -1)[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
               for z, w in zip(cand, window_ids(windows)))
    assert float(result.nll.sum()) == pytest.approx(nll, rel=1e-6)
    same = score_logits(ref, windows, reference=ref)
    assert float(same.kl.sum()) == 0 and int(same.top1.sum()) == windows.n_scored


def test_a_default_run_keeps_its_run_identity_and_an_engine_run_differs():
    plain = RunConfig(scheme="kv4")
    assert "engine" not in identity(plain) and "reference" not in identity(plain)
    assert identity(plain.replace(engine="llama.cpp"))["engine"] == "llama.cpp"


def test_engine_runs_pair_with_no_twin_only_variant():
    assert "sink-fp" in variants(RunConfig(scheme="kv-q4_0"))
    assert variants(RunConfig(scheme="kv-q4_0", engine="llama.cpp")) == ()


def test_engine_plan_maps_names_and_refuses_what_the_engine_cannot_run():
    plan = engine_plan(RunConfig(scheme="kv-q4_0:rot=off", engine="llama.cpp"))
    assert plan["weights"] == "f32" and plan["candidate"]["kv_type"] == "q4_0" and not plan["candidate"]["rotate"]
    assert engine_plan(RunConfig(scheme="q4_k_m", engine="llama.cpp"))["weights"] == "q4_k_m"
    with pytest.raises(UsageError, match="checked twin"):
        engine_plan(RunConfig(scheme="kv-q4_0", mitigation="sink-fp", engine="llama.cpp"))
    with pytest.raises(UsageError, match="not a llama.cpp scheme"):
        engine_plan(RunConfig(scheme="w8a8", engine="llama.cpp"))
    with pytest.raises(UsageError, match="--engine llama.cpp"):
        RunConfig(reference="base.gguf")


def test_a_gguf_path_is_a_model_not_a_pickle(tmp_path):
    path = tmp_path / "shipped.gguf"
    path.write_bytes(b"GGUF" + bytes(20))
    check_model_spec(str(path))  # no UsageError
    assert gguf_path(str(path)) == path and gguf_path(str(tmp_path)) is None
