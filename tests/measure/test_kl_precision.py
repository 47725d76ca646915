"""The KL from the reference summary against a float64 KL from both models' full logits, on one
window of each embedded model (issue 32: the float32 summary with float64 block sums)."""

import copy
import os

import pytest
import torch

from quantsink.data.corpus import TokenStream
from quantsink.data.windows import sliding_windows
from quantsink.measure.passes import ReferenceHead, run_pass

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def rounded_body(model, bits):
    """The model with every linear layer but the output head rounded to ``bits``-bit symmetric integers
    per output row (round to nearest), the head shared: a candidate whose KL is a quantized model's."""
    other = copy.deepcopy(model)
    head = other.get_output_embeddings()
    top = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in other.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                scale = module.weight.abs().amax(1, keepdim=True) / top
                module.weight.copy_((module.weight / scale).round().clamp(-top, top) * scale)
    return other


def float64_kl(reference, candidate, windows):
    """Mean KL(reference || candidate) over the scored positions, float64 from the full float32 logits."""
    mask = windows.scored[:, 1:]
    with torch.inference_mode():
        lp = reference(input_ids=windows.input_ids).logits[:, :-1][mask].double().log_softmax(-1)
        lq = candidate(input_ids=windows.input_ids).logits[:, :-1][mask].double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_the_summary_kl_is_the_float64_kl_of_the_full_logits(name, monkeypatch):
    from quantsink.data.corpus import load_corpus
    from quantsink.data.models import load_model
    from quantsink.measure import passes

    loaded = load_model(name, device="cpu", dtype="float32")
    model = loaded.model
    ids = loaded.tokenizer("\n\n".join(load_corpus("python-docs").documents[:8]))["input_ids"][:257]
    windows = sliding_windows(TokenStream(ids, [1] * len(ids)), window=256, stride=256, prefix=None,
                              max_tokens=len(ids))[0]
    candidate = rounded_body(model, 4)
    ref = run_pass(model, windows, keep_targets=True)
    assert ref.targets.summarised

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt the reference logits although the heads are the same")

    monkeypatch.setattr(passes._Accumulator, "_rebuilt_kl", refuse)
    cand = run_pass(candidate, windows, reference=ref.targets, reference_head=ReferenceHead.of(model))
    exact = float64_kl(model, candidate, windows)
    assert exact > 1e-4
    assert cand.summary()["kl"] == pytest.approx(exact, rel=1e-6, abs=0)
