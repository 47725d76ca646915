"""The quantize-dequantize core: exactness, error bounds, shapes, zeros, ties, keep masks."""

import pytest
import torch

from quantsink.schemes.quant import fake_quant, minmax, qbounds, qparams, quant_dequant


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_representable_values_are_exact(bits, sym):
    qmin, qmax = qbounds(bits, sym)
    scale = 0.037
    grid = torch.arange(qmin, qmax + 1, dtype=torch.float32)
    zero = 0 if sym else 3
    x = ((grid - zero) * scale).reshape(1, -1)  # spans the whole grid: range reproduces scale
    scale_t, zero_t = qparams(torch.tensor(float(x.min())), torch.tensor(float(x.max())), bits, sym)
    y = quant_dequant(x, scale_t, zero_t, bits, sym)
    assert torch.allclose(y, x, atol=1e-6)
    assert torch.allclose(fake_quant(x, bits, sym=sym), x, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran,group", [("tensor", None), ("row", None), ("column", None), ("row", 16),
                                        ("column", 4)])
def test_error_bound_half_step(bits, sym, gran, group):
    torch.manual_seed(bits)
    x = torch.randn(3, 12, 40) * torch.rand(3, 12, 1) * 5  # (B, T, C)
    y = fake_quant(x, bits, sym=sym, gran=gran, group=group)
    lo, hi = minmax(x, gran, group)
    scale, _ = qparams(lo, hi, bits, sym)
    assert y.shape == x.shape and y.dtype == x.dtype
    # every element within half a step of its own block's scale: <= max scale / 2
    assert (y - x).abs().max() <= scale.max() / 2 + 1e-5
    # error shrinks with more bits
    if bits < 8:
        finer = fake_quant(x, bits + 2, sym=sym, gran=gran, group=group)
        assert (finer - x).abs().mean() < (y - x).abs().mean()


def test_int8_relative_error_is_small():
    x = torch.randn(64, 128)
    y = fake_quant(x, 8, gran="row")
    assert ((y - x).abs().amax(1) <= x.abs().amax(1) / 127 / 2 + 1e-6).all()


def test_group_shapes_and_ragged_last_group():
    x = torch.randn(4, 576)  # 576 = 4.5 groups of 128
    lo, hi = minmax(x, "row", 128)
    assert lo.shape == (4, 5, 1)
    y = fake_quant(x, 4, sym=False, gran="row", group=128)
    assert y.shape == x.shape
    # the ragged last block (64 columns) is quantized on its own range
    alone = fake_quant(x[:, 512:], 4, sym=False, gran="row")
    assert torch.equal(y[:, 512:], alone)
    # groups are independent: each block equals quantizing that block alone
    assert torch.equal(y[:, 128:256], fake_quant(x[:, 128:256], 4, sym=False, gran="row"))


def test_column_group_blocks_tokens():
    x = torch.randn(2, 10, 8)  # (B, T, C)
    lo, _ = minmax(x, "column", 4)
    assert lo.shape == (2, 8, 3, 1)  # per sequence, per channel, 3 token blocks (4, 4, 2)
    y = fake_quant(x, 4, gran="column", group=4)
    assert torch.equal(y[:, 4:8], fake_quant(x[:, 4:8], 4, gran="column"))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "row", "column"])
def test_zero_tensor_no_nan(sym, gran):
    x = torch.zeros(2, 3, 5)
    y = fake_quant(x, 4, sym=sym, gran=gran)
    assert torch.equal(y, x)
    # a zero row next to non-zero rows: still exact zeros, no NaN
    x[0, 1] = torch.arange(5.0)
    y = fake_quant(x, 4, sym=sym, gran="row")
    assert torch.isfinite(y).all() and torch.equal(y[1], x[1])


def test_ties_round_half_to_even():
    scale, zero = torch.tensor(1.0), torch.tensor(0.0)
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5]])
    assert quant_dequant(x, scale, zero, 8, True).tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0]]


def test_clamping_to_grid():
    scale, zero = torch.tensor(1.0), torch.tensor(0.0)
    x = torch.tensor([[300.0, -300.0]])
    assert quant_dequant(x, scale, zero, 8, True).tolist() == [[127.0, -127.0]]
    assert quant_dequant(x, scale, zero, 4, False).tolist() == [[15.0, 0.0]]


def test_asymmetric_beats_symmetric_on_one_sided_data():
    x = torch.rand(8, 64)  # all positive
    sym = (fake_quant(x, 4, sym=True, gran="row") - x).abs().mean()
    asym = (fake_quant(x, 4, sym=False, gran="row") - x).abs().mean()
    assert asym < sym


@pytest.mark.parametrize("gran", ["tensor", "row", "column"])
def test_keep_rows_pass_through_and_leave_ranges(gran):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    spiked = x.clone()
    spiked[:, 0] *= 1000  # an extreme token at position 0
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, 0] = True
    y = fake_quant(spiked, 8, gran=gran, keep=keep)
    assert torch.equal(y[:, 0], spiked[:, 0])  # bit-identical
    # the other positions are quantized exactly as if the extreme token were absent (zeroed)
    zeroed = spiked.masked_fill(keep[..., None], 0)
    assert torch.equal(y[:, 1:], fake_quant(zeroed, 8, gran=gran)[:, 1:])
    # and far better than with the extreme token inside the range (per-tensor / per-column)
    if gran != "row":
        assert (y - spiked)[:, 1:].abs().max() < (fake_quant(spiked, 8, gran=gran) - spiked)[:, 1:].abs().max() / 10


def test_sequences_are_independent():
    x = torch.randn(3, 8, 16)
    y = fake_quant(x, 6, gran="tensor")
    assert torch.equal(y[1:2], fake_quant(x[1:2], 6, gran="tensor"))


def test_bad_arguments():
    with pytest.raises(ValueError):
        qbounds(1, True)
    with pytest.raises(ValueError):
        qbounds(9, False)
    with pytest.raises(ValueError):
        fake_quant(torch.randn(4, 4), 8, gran="tensor", group=2)
    with pytest.raises(ValueError):
        fake_quant(torch.randn(4), 8)


def test_bfloat16_keeps_dtype():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = fake_quant(x, 8, gran="row")
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def _reference_quant_dequant(x, scale, zero, bits, sym):
    """The textbook formula, out of place: (clamp(round(x / s) + z, qmin, qmax) - z) * s."""
    qmin, qmax = qbounds(bits, sym)
    q = torch.clamp(torch.round(x.float() / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,sym", [(8, True), (8, False), (4, False), (3, True)])
def test_in_place_quant_dequant_equals_the_formula_bit_for_bit(dtype, bits, sym):
    torch.manual_seed(bits)
    x = (torch.randn(2, 16, 40) * 4).to(dtype)
    x[0, 0, 0], x[1, 3, 5] = 1e6, -1e6  # far outside any range below: clamped
    for lo, hi in [(-3.0, 5.0), (-0.2, 0.1), (0.0, 2.0)]:  # a narrow static range too
        scale, zero = qparams(torch.tensor(lo), torch.tensor(hi), bits, sym)
        y = quant_dequant(x, scale, zero, bits, sym)
        assert y.dtype == dtype and torch.equal(y, _reference_quant_dequant(x, scale, zero, bits, sym))
    lo, hi = minmax(x, "row", 8)  # per-block scales and zero points, broadcast
    scale, zero = qparams(lo, hi, bits, sym)
    blocked = x.reshape(2, 16, 5, 8)
    assert torch.equal(quant_dequant(blocked, scale, zero, bits, sym),
                       _reference_quant_dequant(blocked, scale, zero, bits, sym))


def test_quant_dequant_never_writes_its_input():
    x = torch.randn(4, 32)
    before = x.clone()
    scale, zero = qparams(x.min(), x.max(), 4, False)
    quant_dequant(x, scale, zero, 4, False)
    fake_quant(x, 8, gran="row", keep=torch.tensor([True, False, False, True]))
    assert torch.equal(x, before)
