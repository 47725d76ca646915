"""The float perturbations behind the noise margin: each changes the numbers at float32's rounding step
and leaves the model exactly as it was."""

import torch

from quantsink.pipeline.run import JITTER, PERTURBATIONS, jitter


def test_jitter_moves_every_weight_by_one_rounding_step_and_restores_it_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 16)
    out = model(x)
    with jitter(model, 1):
        moved = [p.detach().clone() for p in model.parameters()]
        jittered = model(x)
    for b, m in zip(before, moved):
        if not b.any():
            assert torch.equal(m, b)  # zero stays zero (LayerNorm's bias)
            continue
        ratio = (m / b)[b != 0]
        assert torch.all((ratio - 1).abs() <= 2 * JITTER) and torch.any(ratio != 1)
    assert not torch.equal(jittered, out) and torch.allclose(jittered, out, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with jitter(model, 1):
        again = [p.detach().clone() for p in model.parameters()]
    with jitter(model, 2):
        other = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, m) for a, m in zip(again, moved))  # seeded
    assert any(not torch.equal(a, o) for a, o in zip(again, other))  # another seed, another draw


def test_the_default_draws_are_the_kernel_and_two_jitters():
    assert list(PERTURBATIONS)[:3] == ["kernel", "jitter:1", "jitter:2"]
