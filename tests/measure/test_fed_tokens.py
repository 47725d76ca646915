"""lm-eval's protocol feeds the model what HFLM feeds it: each row but its last token, which is a target only.
The other protocols keep feeding it (their records were made so)."""

import dataclasses

import pytest
import torch

from quantsink.data.corpus import TokenStream
from quantsink.data.windows import rolling_windows
from quantsink.hooks.sites import attach
from quantsink.measure.passes import ReferenceHead, run_pass, window_ids
from quantsink.mitigations.sink_token import prepend
from quantsink.schemes import QuantContext, parse_scheme
from tests.tiny import tiny_llama

LOUD, PEAK = 7, 5  # a token that lives in channel PEAK, which the norms amplify x30: it sets any range it enters


def lm_eval_windows(loud_last: bool = False) -> object:
    """lm-eval's rows for documents of 150, 46 and 22 tokens (widths 65, 65, 65, 47, 23), window 64; with
    ``loud_last``, every row's last token (a target only) is ``LOUD``."""
    gen = torch.Generator().manual_seed(4)
    docs = [torch.randint(10, 320, (n,), generator=gen).tolist() for n in (150, 46, 22)]
    windows = rolling_windows([TokenStream(d, [1] * len(d)) for d in docs], length=64, prefix=0, pad=0)
    if loud_last:
        windows.input_ids[torch.arange(len(windows)), windows.attention_mask.sum(1) - 1] = LOUD
    return windows


def fed_widths(model, windows, **kwargs) -> list[int]:
    widths: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a, k: widths.extend([k["input_ids"].shape[1]]
                                                                           * k["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        run_pass(model, windows, **kwargs)
    finally:
        handle.remove()
    return widths


def test_lm_eval_rows_are_fed_without_their_last_token_and_other_windows_whole():
    tiny = tiny_llama(320)
    windows = lm_eval_windows()
    assert not windows.feeds_last
    assert fed_widths(tiny, windows, keep_targets=True) == [64, 64, 64, 46, 22]
    assert fed_widths(tiny, dataclasses.replace(windows, feeds_last=True)) == [65, 65, 65, 47, 23]
    assert [len(ids) for ids in window_ids(windows)] == [64, 64, 64, 46, 22]  # what another engine decodes
    assert windows.fed_lengths.tolist() == [64, 64, 64, 46, 22]
    assert dataclasses.replace(windows, feeds_last=True).fed_lengths.tolist() == [65, 65, 65, 47, 23]
    assert not prepend(windows, 1).feeds_last  # a prepended sink token keeps the protocol


def test_the_last_token_is_never_scored_so_float_numbers_stay():
    """A float model: the last position predicts nothing, so NLL, KL and the reference's targets agree with the
    rows fed whole (to float rounding: the attention kernel's blocks follow the width)."""
    tiny, noisy = tiny_llama(320, seed=1), tiny_llama(320, seed=2)
    windows = lm_eval_windows()
    whole = dataclasses.replace(windows, feeds_last=True)
    ref, ref_whole = run_pass(tiny, windows, keep_targets=True), run_pass(tiny, whole, keep_targets=True)
    cand = run_pass(noisy, windows, reference=ref.targets, reference_head=ReferenceHead.of(tiny))
    cand_whole = run_pass(noisy, whole, reference=ref_whole.targets, reference_head=ReferenceHead.of(tiny))
    assert len(ref.token_nll) == windows.n_scored
    torch.testing.assert_close(ref.token_nll, ref_whole.token_nll, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cand.token_kl, cand_whole.token_kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref.targets.expected_embedding, ref_whole.targets.expected_embedding)
    assert float(cand.kl.sum()) > 0


def hflm_nll(model, windows, hooks) -> torch.Tensor:
    """Each row scored as HFLM scores it: one forward of ``tokens[:-1]`` (B=1), float64 log-softmax."""
    out = []
    with attach(model, hooks), torch.inference_mode():
        for i in range(len(windows)):
            n = int(windows.attention_mask[i].sum())
            ids = windows.input_ids[i, :n]
            logp = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0].double(), -1)  # (n-1, V)
            nll = -logp[torch.arange(n - 1), ids[1:]]
            out.append(nll[windows.scored[i, 1:n]])
    return torch.cat(out)


def test_a_per_sequence_dynamic_scheme_sees_what_hflm_feeds():
    """w8a8-dyn takes one activation range per sequence: a loud last token would set it if it were fed.  Fed as
    HFLM feeds, every scored token's NLL is HFLM's; fed whole, it is not."""
    tiny = tiny_llama(320, seed=1)
    with torch.no_grad():
        embed = tiny.model.embed_tokens.weight  # (V, C)
        embed[:, PEAK], embed[LOUD] = 0, 0
        embed[LOUD, PEAK] = 1
        for layer in tiny.model.layers:
            layer.input_layernorm.weight[PEAK] = layer.post_attention_layernorm.weight[PEAK] = 30
    ctx = QuantContext()
    model = parse_scheme("w8a8-dyn").apply(tiny, ctx)
    windows = lm_eval_windows(loud_last=True)
    expected = hflm_nll(model, windows, ctx.hooks)
    with attach(model, ctx.hooks):
        fed = run_pass(model, windows).token_nll
        whole = run_pass(model, dataclasses.replace(windows, feeds_last=True)).token_nll
    torch.testing.assert_close(fed, expected, rtol=1e-5, atol=1e-5)
    assert float((whole - expected).abs().max()) > 1e-2


def test_rows_of_several_widths_cannot_drop_their_last_token():
    windows = lm_eval_windows()
    with pytest.raises(ValueError, match="one width"):
        windows.subset(slice(2, 4)).trimmed().model_input()
