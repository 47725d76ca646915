"""Evaluator 5's speed-ups change no number they should not: the oneDNN linear kernel, the head at scored
positions only, the normaliser in place, and scoring steps with no one-row tail."""

import importlib

import pytest
import torch

from quantsink.measure import kernels
from quantsink.measure.passes import ReferenceHead, normaliser, run_pass, scored_logits, steps
from tests.measure.test_evaluate import random_windows
from tests.tiny import tiny_llama

passes = importlib.import_module("quantsink.measure.passes")
needs_onednn = pytest.mark.skipif(kernels.kernel_name() != "onednn", reason="torch built without oneDNN")


@needs_onednn
def test_fast_linear_routes_float32_linears_to_onednn_and_leaves_the_rest(monkeypatch):
    calls = []
    real = kernels.onednn_linear
    monkeypatch.setattr(kernels, "onednn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    half = torch.nn.Linear(16, 8).bfloat16()
    with torch.inference_mode(), kernels.fast_linear():
        y = lin(x)
        half(x.bfloat16())  # another dtype: torch's own kernel
    assert calls == [(3, 5, 16)] and y.shape == (3, 5, 8)
    assert torch.allclose(y, torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)
    with kernels.fast_linear():
        assert lin(x).requires_grad and len(calls) == 1  # autograd records it: not routed


class _Wrapped(torch.Tensor):
    """A tensor subclass, as torchao's and quanto's quantized weights are."""


@needs_onednn
def test_a_tensor_subclass_weight_keeps_its_own_linear(monkeypatch):
    """torchao's IntxUnpackedToInt8Tensor has no oneDNN op: such weights must never be routed there."""
    calls = []
    monkeypatch.setattr(kernels, "onednn_linear", lambda *a: calls.append(1))
    weight = torch.Tensor._make_subclass(_Wrapped, torch.randn(8, 16))
    with torch.inference_mode(), kernels.fast_linear():
        y = torch.nn.functional.linear(torch.randn(4, 16), weight)
    assert calls == [] and y.shape == (4, 8)


@needs_onednn
def test_a_rows_result_does_not_depend_on_the_other_rows_or_the_threads():
    weight, x = torch.randn(96, 48), torch.randn(200, 48)
    full = kernels.onednn_linear(x, weight)
    assert torch.equal(kernels.onednn_linear(x[17:60], weight), full[17:60])
    assert torch.equal(kernels.onednn_linear(x[[3, 150]], weight), full[[3, 150]])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.onednn_linear(x, weight), full)
    finally:
        torch.set_num_threads(threads)


def test_fast_linear_is_reentrant_and_undone_on_exit():
    with kernels.fast_linear():
        with kernels.fast_linear():
            pass
        assert getattr(kernels._active, "on", False) == (kernels.kernel_name() == "onednn")
    assert not getattr(kernels._active, "on", False)


def test_the_head_at_scored_positions_gives_the_numbers_of_the_whole_batchs_logits(monkeypatch):
    """Windows with unscored context (stride < window): the head runs on the scored rows only, and the
    reference pass, a candidate's NLL, KL and top-1 are the same bits as with the whole (B, T, V) logits."""
    tiny = tiny_llama(320, seed=1)
    noisy = tiny_llama(320, seed=2)
    windows = random_windows(window=32, stride=16, prefix=0)
    keep = scored_logits(tiny, windows)
    assert keep is not None and keep.shape == windows.input_ids.shape
    assert int(keep.sum()) == windows.n_scored < windows.input_ids.numel()  # context positions skipped

    def both() -> tuple:
        ref = run_pass(tiny, windows, keep_targets=True, batch_tokens=256)
        cand = run_pass(noisy, windows, reference=ref.targets, reference_head=ReferenceHead.of(tiny),
                        batch_tokens=256)
        return ref, cand
    fast = both()
    monkeypatch.setattr(passes, "scored_logits", lambda model, windows: None)
    full = both()
    for a, b in zip(fast, full):
        assert torch.equal(a.nll, b.nll) and torch.equal(a.token_nll, b.token_nll)
    assert all(torch.equal(getattr(fast[0].targets, f), getattr(full[0].targets, f))
               for f in ("hidden", "neg_entropy", "expected_embedding", "argmax"))
    assert torch.equal(fast[1].kl, full[1].kl) and torch.equal(fast[1].top1, full[1].top1)
    assert float(fast[1].kl.sum()) > 0


def test_a_model_whose_output_is_hooked_gets_its_whole_logits():
    tiny = tiny_llama(320)
    windows = random_windows(window=32, stride=32, prefix=0)
    handle = tiny.register_forward_hook(lambda module, args, out: out)  # e.g. a mitigation joining logits
    try:
        assert scored_logits(tiny, windows) is None
    finally:
        handle.remove()
    assert scored_logits(tiny, windows) is not None


def test_the_in_place_normaliser_gives_the_same_bits():
    z = torch.randn(300, 1000) * 4
    kept, spent = z.clone(), z.clone()
    a, b = normaliser(kept), normaliser(spent, spent=True)
    assert torch.equal(kept, z) and not torch.equal(spent, z)  # only the spent copy is overwritten
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("n, step, sizes", [(10, 4, [4, 4, 2]), (9, 4, [4, 3, 2]), (1, 4, [1]), (8, 4, [4, 4]),
                                            (5, 4, [3, 2])])
def test_scoring_steps_never_leave_one_row_alone(n, step, sizes):
    got = steps(n, step)
    assert [s.stop - s.start for s in got] == sizes and got[0].start == 0 and got[-1].stop == n
