"""Floating-point element formats and their scale rules: pure quantize-dequantize functions.

Each function returns ``x`` rounded to the format and mapped back (fake quantization), float32
arithmetic, the input's dtype out.  ``keep`` (``(..., R)`` bool over the rows of an ``(..., R, C)``
tensor) marks rows that stay in full precision and are left out of every range.

* **FP8 E4M3** (``float8_e4m3fn``: no infinities, largest finite 448, subnormals down to 2^-9).
  The rounding itself is torch's cast to ``torch.float8_e4m3fn`` (round to nearest, ties to even),
  after a clamp to +-448 (saturation, as engines cast).  Scale per group: ``amax / 448`` in FP32,
  so a group's largest magnitude lands on 448; an all-zero group gets scale 1.
* **E2M1** (FP4) elements: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, round to nearest, ties to even
  (the even code), saturating at +-6.
* **MXFP4** (OCP Microscaling v1.0): blocks of 32 consecutive elements along the last dim, one
  E8M0 (power-of-two) scale each.  OCP section 6.3: ``X = 2^(floor(log2 amax) - 2)`` (2 = the
  exponent of E2M1's largest value, 6 = 1.5 * 2^2), i.e. the shared scale is rounded DOWN to a power
  of two, so ``amax / X`` lies in [4, 8) and elements above ``6 X`` saturate to 6 (``scale=floor``,
  the default, and torchao's ``FLOOR``).  ``scale=ceil`` rounds up instead
  (``X = 2^ceil(log2(amax / 6))``, nothing saturates; NVIDIA's ``RCEIL`` choice).  The exponent is
  clamped to E8M0's [-127, 127]; an all-zero block gets 2^-127; a block whose amax is NaN or +-Inf
  gets the NaN scale (every element NaN).
* **NVFP4** (NVIDIA): blocks of 16, an E4M3 scale each, plus one FP32 scale per tensor:
  ``s_t = amax_tensor / (448 * 6)``, ``s_b = e4m3(amax_block / 6 / s_t)`` (round to nearest even,
  subnormals kept, as TensorRT-LLM's kernel does; a block whose scale rounds to 0 dequantizes to 0),
  elements ``e2m1(x * ((1 / s_t) / s_b))`` (torchao's reciprocal order), dequantized as
  ``q * s_b * s_t``.  torchao differs in one detail: it clamps ``s_b`` up to E4M3's smallest normal
  (2^-6), which only matters for blocks 2^6 x smaller than ``amax_tensor / 448``.

NaN in a scale group (FP8 row, MX/NV block) makes the whole group NaN, as a NaN scale would.
"""

from __future__ import annotations

from typing import Literal

import torch

from quantsink.schemes.quant import Granularity, blocked  # one block view for integer and float formats

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of E2M1's largest normal (6 = 1.5 * 2^2)
E8M0_EXP = (-127, 127)
MX_BLOCK, NV_BLOCK = 32, 16


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value (ties to even, saturating at +-448), as float32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (ties to the even code, saturating at +-6), as float32."""
    x = x.float()
    return _round_e2m1_magnitude_(x.abs()).copysign_(x)


def _round_e2m1_magnitude_(a: torch.Tensor) -> torch.Tensor:
    """Round magnitudes ``a`` (float32, >= 0, overwritten) to E2M1, in place.

    The grid's spacing is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6].  Adding and subtracting
    ``c = 2^22, 2^23, 2^24`` (whose float32 spacing is exactly that; ``c``'s exponent is ``a``'s
    clamped to [0, 2], plus 22) rounds to a multiple of the spacing, ties to an even multiple,
    which is the even code (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4).  NaN stays NaN."""
    a = a.clamp_(max=E2M1_MAX)
    exponent = torch.bitwise_right_shift(a.view(torch.int32), 23).clamp_(127, 129)  # biased, of 1..6
    c = exponent.add_(22).bitwise_left_shift_(23).view(torch.float32)  # 2^22, 2^23 or 2^24
    return a.add_(c).sub_(c)


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x.masked_fill(keep[..., None], 0)


def _restore_kept(x: torch.Tensor, out: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    out = out.to(x.dtype)
    return out if keep is None else torch.where(keep[..., None], x, out)


# --------------------------------------------------------------------------- FP8 E4M3


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """FP32 scale mapping ``amax`` onto 448; 1 for an all-zero group (NaN stays NaN)."""
    amax = amax.float()
    return torch.where(amax == 0, torch.ones_like(amax), amax / E4M3_MAX)


def fake_fp8(x: torch.Tensor, gran: Granularity = "tensor", group: int | None = None,
             keep: torch.Tensor | None = None, amax: torch.Tensor | None = None) -> torch.Tensor:
    """E4M3 quantize-dequantize with one FP32 scale per group of ``gran`` / ``group`` (see
    :func:`blocked`), or with the given ``amax`` (a static, calibrated range; broadcast)."""
    view, restore = blocked(_masked(x, keep).float(), gran, group)
    if amax is None:
        amax = view.abs().amax(-1, keepdim=True)
        values, _ = blocked(x.float(), gran, group)
    else:
        values = x.float()
        restore = lambda y: y  # noqa: E731  (static: one scale for all of x)
    scale = fp8_scale(amax)
    return _restore_kept(x, restore(round_e4m3(values / scale) * scale), keep)


# --------------------------------------------------------------------------- MXFP4 (OCP MX)


def _frexp_exponent(v: torch.Tensor) -> torch.Tensor:
    """``e`` with ``v = m * 2^e``, ``m`` in [0.5, 1): ``floor(log2 v) = e - 1``, exact in float32."""
    return torch.frexp(v).exponent.to(torch.int32)


def mx_scale(amax: torch.Tensor, rounding: Literal["floor", "ceil"] = "floor") -> torch.Tensor:
    """The E8M0 shared scale of each block, as float32 (NaN for a NaN/Inf block)."""
    amax = amax.float()
    if rounding == "floor":  # OCP: 2^(floor(log2 amax) - emax)
        exp = _frexp_exponent(amax) - 1 - E2M1_EMAX
    else:  # smallest power of two with amax / X <= 6
        q = amax / E2M1_MAX
        mantissa, e = torch.frexp(q)
        exp = e.to(torch.int32) - (mantissa == 0.5).to(torch.int32)
    exp = torch.where(amax == 0, E8M0_EXP[0], exp).clamp(*E8M0_EXP)
    scale = torch.exp2(exp.float())
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def fake_mxfp4(x: torch.Tensor, block: int = MX_BLOCK, rounding: Literal["floor", "ceil"] = "floor",
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 quantize-dequantize: E2M1 elements, one E8M0 scale per ``block`` elements of the last dim."""
    values, restore = blocked(x.float(), "row", block)  # (..., R, C/block, block)
    magnitude = blocked(_masked(x, keep).float().abs(), "row", block)[0]  # a fresh tensor, reused below
    scale = mx_scale(magnitude.amax(-1, keepdim=True), rounding)
    q = _round_e2m1_magnitude_(magnitude.div_(scale)).copysign_(values)  # kept rows: restored below
    return _restore_kept(x, restore(q.mul_(scale)), keep)


# --------------------------------------------------------------------------- NVFP4


def nv_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor FP32 scale ``amax / (448 * 6)``; 1 for an all-zero tensor."""
    amax = amax.float()
    return torch.where(amax == 0, torch.ones_like(amax), amax / (E4M3_MAX * E2M1_MAX))


def nv_block_scale(block_amax: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4's E4M3 block scale (relative to the tensor scale), as float32."""
    return round_e4m3(block_amax.float() / E2M1_MAX / tensor_scale)


def fake_nvfp4(x: torch.Tensor, block: int = NV_BLOCK, keep: torch.Tensor | None = None,
               amax: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``x`` (``(..., R, C)``): E2M1 elements, an E4M3 scale per
    ``block`` elements of the last dim, and one FP32 tensor scale per leading index (from ``x``'s
    amax, or from ``amax``: a static, calibrated one)."""
    magnitude = _masked(x, keep).float().abs()  # a fresh tensor, reused below
    if amax is None:
        amax = magnitude.amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1): one per leading index
    s_t = nv_tensor_scale(amax)[..., None]  # broadcasts over (..., R, C/block, block)
    values, restore = blocked(x.float(), "row", block)
    magnitude = blocked(magnitude, "row", block)[0]
    s_b = nv_block_scale(magnitude.amax(-1, keepdim=True), s_t)
    recip = torch.where(s_b > 0, (1.0 / s_t) / s_b, torch.zeros_like(s_b))  # a zero block scale: the block is 0
    q = _round_e2m1_magnitude_(magnitude.mul_(recip)).copysign_(values)
    return _restore_kept(x, restore(q.mul_(s_t * s_b)), keep)  # torchao's order: q * (s_t * s_b)


FORMAT_BITS = {"fp8": 8, "mxfp4": 4, "nvfp4": 4}
