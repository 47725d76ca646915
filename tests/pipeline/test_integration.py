"""Integration on the embedded smollm2-135m (real weights, real bitsandbytes), small budget."""

import pytest

from quantsink.config import RunConfig
from quantsink.records.store import load_record
from quantsink.pipeline.run import Session, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session():
    return Session()


@pytest.fixture(scope="module")
def records(session, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = RunConfig(corpus="python-code", window=256, max_tokens=1024, results=str(out), stats=False)
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: an empty reference cache of its own
        patch.setenv("QUANTSINK_REFERENCE_CACHE", str(tmp_path_factory.mktemp("reference-cache")))
        return {s: run(base.replace(scheme=s), session=session).to_dict() for s in ("fp32", "int8", "nf4")}


def test_perplexity_orders_fp32_int8_nf4(records):
    ppl = {s: r["candidate"]["ppl"] for s, r in records.items()}
    ref = records["fp32"]["reference"]["ppl"]
    assert ppl["fp32"] == pytest.approx(ref, rel=1e-9)
    assert ref < ppl["int8"] < ppl["nf4"]
    assert ppl["int8"] < 1.1 * ref  # LLM.int8 stays close
    assert records["fp32"]["candidate"]["kl"] == pytest.approx(0, abs=1e-9)
    assert records["int8"]["candidate"]["kl"] < records["nf4"]["candidate"]["kl"]


def test_reference_is_computed_once(records):
    assert records["fp32"]["reference"]["cached"] is False
    assert records["int8"]["reference"]["cached"] is True and records["nf4"]["reference"]["cached"] is True
    assert records["int8"]["reference"]["nll_per_window"] == records["fp32"]["reference"]["nll_per_window"]


def test_record_round_trip_and_contents(records):
    rec = records["int8"]
    back = load_record(f"{rec['config']['results']}/{rec['run_id']}.json").to_dict()
    assert back == rec and back["run_id"] == rec["run_id"] and back["candidate"]["ppl"] == pytest.approx(rec["candidate"]["ppl"])
    assert back["model"]["arch"] == "LlamaForCausalLM" and back["model"]["dequantized_from"] == "Q4_1"
    assert back["model"]["n_params"] == 134_515_008
    assert back["scheme"]["params"]["threshold"] == 6.0 and back["scheme"]["simulated"] is False
    assert back["protocol"]["bos_token_id"] is None  # smollm2 adds no BOS
    assert back["protocol"]["scored_tokens"] == 4 * 255
    assert back["env"]["libraries"]["bitsandbytes"] and back["env"]["libraries"]["torch"] and back["env"]["cpu_model"]
    assert len({r["run_id"] for r in records.values()}) == 3


def test_same_inputs_same_numbers(records, session, tmp_path):
    again = run(RunConfig(**{**records["int8"]["config"], "results": str(tmp_path)}), session=session).to_dict()
    assert again["run_id"] == records["int8"]["run_id"]
    assert again["candidate"]["nll_per_window"] == records["int8"]["candidate"]["nll_per_window"]
