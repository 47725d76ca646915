"""The quantize-dequantize core (fake quantization), pure functions.

Integer grid, ``bits`` in 2..8:

* symmetric: ``q in [-(2^(b-1)-1), 2^(b-1)-1]`` (restricted range, zero point 0),
  ``scale = absmax / qmax``;
* asymmetric: ``q in [0, 2^b-1]``, ``scale = (hi - lo) / (2^b-1)``,
  ``zero = round(-lo / scale)``.

Ranges always include 0 (``lo = min(min x, 0)``, ``hi = max(max x, 0)``), so 0 is
exactly representable, zero padding never changes a range, and positions left
out of a range can be zeroed before reducing.  Round-to-nearest, ties to even
(``torch.round``), then clamp to the grid.  A zero range (all-zero block) gets
scale 1: the block quantizes to exact zeros, never NaN.  Arithmetic runs in
float32 and the result has the input's dtype.

Speed: one float32 buffer per call, rounded, clamped and rescaled in place
(``x / scale`` -> round -> clamp to ``[qmin - zero, qmax - zero]`` -> ``* scale``,
which equals ``(clamp(round(x / scale) + zero) - zero) * scale`` exactly: the
grid values are small integers), and ranges reduced in the input's dtype (min and
max are exact in any float dtype).  Each temporary of an activation's size costs a page-faulting
allocation on CPU, more than the arithmetic itself.

Granularity, on a tensor laid out ``(..., R, C)`` (leading dims, e.g. the
sequences of a batch, are always quantized independently):

* ``tensor``: one range per leading index over all ``R x C`` elements
  (a weight ``(out, in)``: one range; activations ``(B, T, C)``: one per sequence);
* ``row``: one range per row, over ``C`` (a weight's output channel; an
  activation's token);
* ``column``: one range per column, over ``R`` (an activation's or key's channel,
  over the tokens of a sequence);
* ``row`` / ``column`` with ``group``: the reduced axis is cut into blocks of
  ``group`` (per-group weights: blocks of input channels; per-channel keys:
  blocks of tokens); a last, shorter block is allowed.

``keep`` (``(..., R)`` bool) marks rows (sequence positions) that stay in full
precision and are left out of every range.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

Granularity = Literal["tensor", "row", "column"]


def qbounds(bits: int, sym: bool) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` for ranges ``[lo, hi]`` (widened to include 0)."""
    qmin, qmax = qbounds(bits, sym)
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    if sym:
        scale = torch.maximum(-lo, hi) / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero range -> exact zeros
    zero = torch.zeros_like(scale) if sym else torch.round(-lo / scale).clamp(qmin, qmax)
    return scale, zero


def quant_dequant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Round ``x`` to the grid of ``(scale, zero)`` (broadcast) and map it back (float32 inside)."""
    qmin, qmax = qbounds(bits, sym)
    q = x / scale if x.dtype == torch.float32 else x.float().div_(scale)  # the one float32 buffer
    q.round_()
    if sym:
        q.clamp_(qmin, qmax)  # zero is 0
    else:
        q.clamp_(qmin - zero, qmax - zero)  # = clamp(q + zero, qmin, qmax) - zero, exactly
    return q.mul_(scale).to(x.dtype)


def _pad_last(x: torch.Tensor, group: int) -> torch.Tensor:
    extra = -x.shape[-1] % group
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


def blocked(x: torch.Tensor, gran: Granularity, group: int | None = None) -> tuple[torch.Tensor, Callable]:
    """View ``x`` (``(..., R, C)``) so that each scale group is one vector along the last dim
    (``tensor``: all of ``R x C`` per leading index; ``row``: each row, or blocks of ``group`` of it;
    ``column``: each column over ``R``, or blocks of ``group`` rows); returns it and the inverse.
    Zero padding completes a last, shorter block (it changes no amax)."""
    *lead, R, C = x.shape
    if gran == "tensor":
        return x.reshape(*lead, 1, R * C), lambda y: y.reshape(x.shape)
    t = x if gran == "row" else x.transpose(-1, -2)  # (..., rows, n) with ranges over n
    n = t.shape[-1]
    g = group or n
    view = _pad_last(t, g).reshape(*t.shape[:-1], -1, g)  # (..., rows, n/g, g)

    def restore(y: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*t.shape[:-1], -1)[..., :n]
        return y if gran == "row" else y.transpose(-1, -2)

    return view, restore


def minmax(x: torch.Tensor, gran: Granularity = "tensor", group: int | None = None,
           keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(lo, hi)`` of ``x`` (0 included), ``keep`` rows left out; shaped like ``blocked``."""
    if keep is not None:
        x = x.masked_fill(keep[..., None], 0)
    view, _ = blocked(x, gran, group)
    lo, hi = view.amin(-1, keepdim=True), view.amax(-1, keepdim=True)  # exact in any float dtype
    return lo.float().clamp_(max=0), hi.float().clamp_(min=0)


def fake_quant(x: torch.Tensor, bits: int, *, sym: bool = True, gran: Granularity = "tensor",
               group: int | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (``(..., R, C)``) with ranges taken per ``gran`` (see module doc)."""
    if x.dim() < 2:
        raise ValueError("fake_quant needs at least 2 dims (..., R, C)")
    if group is not None and (group < 1 or gran == "tensor"):
        raise ValueError("group must be >= 1 and needs gran 'row' or 'column'")
    lo, hi = minmax(x, gran, group, keep)
    scale, zero = qparams(lo, hi, bits, sym)
    view, restore = blocked(x, gran, group)
    out = restore(quant_dequant(view, scale, zero, bits, sym))
    return out if keep is None else keep_rows(out, x, keep)


def keep_rows(out: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``out`` with the ``keep`` rows put back from ``x`` (in place: ``out`` is a fresh tensor)."""
    out[keep] = x[keep]
    return out
