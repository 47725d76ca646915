"""Float formats in simulated quantization: FP8 (E4M3), MXFP4 and NVFP4 (the arithmetic: ``quantsink.schemes.formats``).

``FloatFormats`` is ``Simulated`` with an element format per part (``w_fmt``, ``act_fmt``,
``kv_fmt``; ``int`` keeps the integer grid), so weights, activations and the KV cache act at the
same sites, keep the same full-precision positions, and calibrate the same way.  Weights are
quantized once, at apply time.  Scales per part:

* FP8: weights per output channel (``w_gran``), activations dynamic per token or per sequence, or
  static per tensor (``act_mode=static``: one FP32 scale from the calibration windows' absmax);
  keys / values per token (one head per scale), per channel, or ``tensor``: one static FP32 scale
  per layer from the calibration windows (vLLM's and TensorRT-LLM's FP8 KV cache).
* MXFP4: one E8M0 scale per ``block`` (32) consecutive input channels, always from the data
  (``mx_scale``: ``floor`` as OCP, or ``ceil``).
* NVFP4: one E4M3 scale per ``block`` (16) input channels from the data, and one FP32 scale per
  tensor: per weight; for activations static from the calibration windows' absmax (``act_mode=static``,
  as the ModelOpt checkpoints vLLM and TensorRT-LLM load), or dynamic per sequence or per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from quantsink.schemes import formats as F
from ..errors import QuantsinkError
from . import register
from .simulated import ActQuantizer, KeepFp, Simulated, key_site_doc

Fmt = Literal["int", "fp8", "mxfp4", "nvfp4"]
STANDARD_BLOCK = {"mxfp4": F.MX_BLOCK, "nvfp4": F.NV_BLOCK}


def _fp8(q: "FormatQuantizer", x: torch.Tensor, keep: Any, amax: Any) -> torch.Tensor:
    return F.fake_fp8(x, q.gran, q.group, keep=keep, amax=amax)


def _mxfp4(q: "FormatQuantizer", x: torch.Tensor, keep: Any, amax: Any) -> torch.Tensor:
    return F.fake_mxfp4(x, q.group, q.rounding, keep=keep)


def _nvfp4(q: "FormatQuantizer", x: torch.Tensor, keep: Any, amax: Any) -> torch.Tensor:
    if amax is None and q.gran == "row":  # the FP32 scale per token instead of per sequence
        amax = (x if keep is None else x.masked_fill(keep[..., None], 0)).float().abs().amax(-1, keepdim=True)
    return F.fake_nvfp4(x, q.group, keep=keep, amax=amax)


FAKE: dict[str, Callable[..., torch.Tensor]] = {"fp8": _fp8, "mxfp4": _mxfp4, "nvfp4": _nvfp4}


class FormatQuantizer(ActQuantizer):
    """An activation or KV quantizer in a float format.  ``gran`` (``tensor`` per sequence, ``row``
    per token, ``column`` per channel) and ``group`` place FP8 scales; for MXFP4 / NVFP4 ``group``
    is the block and ``gran`` the scope of NVFP4's FP32 scale.  ``static``: the range comes from
    the calibration windows (observed as ``ActQuantizer`` observes it)."""

    def __init__(self, fmt: str, mode: str, gran: str, group: int | None, keep: KeepFp, rounding: str = "floor",
                 share: bool = True):
        super().__init__(F.FORMAT_BITS[fmt], True, mode, gran, keep)
        self.fmt, self.group, self.rounding, self.share = fmt, group, rounding, share

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        if self.observing:
            return super()._quantize(x)
        amax = self._static_amax()
        compute = lambda: FAKE[self.fmt](self, x, self.keep.rows(x), amax)  # noqa: E731
        if not self.share:  # KV tensors are never shared between quantizers
            return compute()
        key = (self.fmt, self.gran, self.group, self.rounding, None if amax is None else float(amax))
        return self.shared.get(x, key, compute)  # q/k/v (gate/up) read one tensor: quantize it once

    def _static_amax(self) -> torch.Tensor | None:
        if self.mode != "static":
            return None
        if not self.calibrated:
            raise QuantsinkError("static quantizer used before calibration")
        return torch.maximum(-self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"{self.fmt} {self.mode} gran={self.gran} group={self.group}"


@dataclass(frozen=True)
class FloatFormats(Simulated):
    """``Simulated`` with float element formats; ``block`` overrides the MX (32) / NV (16) block size."""

    w_fmt: Fmt = "int"
    act_fmt: Fmt = "int"
    kv_fmt: Literal["int", "fp8"] = "int"
    k_gran: Literal["token", "channel", "tensor"] = "token"
    v_gran: Literal["token", "channel", "tensor"] = "token"
    block: int | None = None
    mx_scale: Literal["floor", "ceil"] = "floor"

    def __post_init__(self) -> None:
        super().__post_init__()
        for part in ("w", "act", "kv"):
            fmt, bits = getattr(self, f"{part}_fmt"), getattr(self, f"{part}_bits")
            if fmt != "int" and bits not in (None, F.FORMAT_BITS[fmt]):
                raise ValueError(f"{part}_bits is fixed by {part}_fmt={fmt} ({F.FORMAT_BITS[fmt]}); "
                                 f"{part}_bits=none leaves that part in float")
        if self.act_fmt == "mxfp4" and self.act_mode == "static":
            raise ValueError("MXFP4 block scales come from the data: act_mode must be dynamic")
        if self.kv_fmt != "fp8" and "tensor" in (self.k_gran, self.v_gran):
            raise ValueError("k_gran/v_gran=tensor (a static per-tensor scale) needs kv_fmt=fp8")
        if self.block is not None and self.block < 1:
            raise ValueError("block must be >= 1")

    def spec_key(self, key: str) -> str:
        """``group`` is the block size when weights or activations are MXFP4 / NVFP4."""
        if key == "group" and {self.w_fmt, self.act_fmt} & set(STANDARD_BLOCK):
            return "block"
        return super().spec_key(key)

    def blocks(self, fmt: str) -> int | None:
        return self.block or STANDARD_BLOCK.get(fmt)

    def needs_calibration(self) -> bool:
        return super().needs_calibration() or (self.kv_bits is not None and "tensor" in (self.k_gran, self.v_gran))

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:  # (out, in)
        if self.w_fmt == "int":
            return super().quantize_weight(w)
        gran = {"channel": "row", "group": "row", "tensor": "tensor"}[self.w_gran]
        group = self.w_group if self.w_gran == "group" else None
        weights = {"fp8": lambda: F.fake_fp8(w, gran, group),
                   "mxfp4": lambda: F.fake_mxfp4(w, self.blocks("mxfp4"), self.mx_scale),
                   "nvfp4": lambda: F.fake_nvfp4(w, self.blocks("nvfp4"))}
        return weights[self.w_fmt]()

    def act_quantizer(self, keep: KeepFp) -> nn.Module:
        if self.act_fmt == "int":
            return super().act_quantizer(keep)
        gran = {"tensor": "tensor", "token": "row"}[self.act_gran]
        return FormatQuantizer(self.act_fmt, self.act_mode, gran, self.blocks(self.act_fmt), keep, self.mx_scale)

    def kv_quantizer(self, gran: str, group: int | None, keep: KeepFp) -> nn.Module:
        if self.kv_fmt == "int":
            return super().kv_quantizer(gran, group, keep)
        mode = "static" if gran == "tensor" else "dynamic"
        return FormatQuantizer("fp8", mode, {"token": "row", "channel": "column", "tensor": "tensor"}[gran],
                               None if gran == "tensor" else group, keep, share=False)

    def parts(self) -> dict[str, str | None]:
        plain = self if self.kv_fmt == "int" else dataclasses.replace(self, k_gran="token", v_gran="token")
        base = Simulated.parts(plain)  # the int parts' wording (the FP8 KV's `tensor` is not an int granularity)
        described = {"weights": (self.w_fmt, self._weights), "activations": (self.act_fmt, self._activations),
                     "kv": (self.kv_fmt, self._kv)}
        return {part: (text() if fmt != "int" and base[part] else base[part])
                for part, (fmt, text) in described.items()}

    def _scales(self, fmt: str, fp8_scope: str) -> str:
        return {"fp8": f"E4M3, one FP32 scale (absmax / 448) {fp8_scope}",
                "mxfp4": f"MXFP4: E2M1, one E8M0 scale per {self.blocks('mxfp4')} channels "
                         f"(shared exponent rounded {'down, OCP' if self.mx_scale == 'floor' else 'up'})",
                "nvfp4": f"NVFP4: E2M1, one E4M3 scale per {self.blocks('nvfp4')} channels and one FP32 scale "
                         f"{fp8_scope}"}[fmt]

    def _weights(self) -> str:
        scope = {"channel": "per output channel", "tensor": "per tensor",
                 "group": f"per {self.w_group} input channels"}[self.w_gran]
        return self._scales(self.w_fmt, "per tensor" if self.w_fmt == "nvfp4" else scope)

    def _activations(self) -> str:
        scope = {("dynamic", "tensor"): "per sequence, dynamic", ("dynamic", "token"): "per token, dynamic",
                 ("static", "tensor"): "per tensor, static (from the calibration windows)"}[
                     (self.act_mode, self.act_gran)]
        return self._scales(self.act_fmt, scope) + " on the input of every selected Linear"

    def _kv(self) -> str:
        scope = {"token": f"per token (groups of {self.kv_group or 'head_dim'} channels)",
                 "channel": f"per channel (over {f'blocks of {self.kv_group} tokens' if self.kv_group else 'the window'})",
                 "tensor": "per tensor, static (from the calibration windows)"}
        return (f"E4M3; keys one FP32 scale {scope[self.k_gran]}, values {scope[self.v_gran]}; "
                f"{key_site_doc(self.kv_keys)}")


def _preset(name: str, help: str, **fields: Any) -> None:
    register(FloatFormats(name=name, **fields), help + " (simulated)")


_W_FP8 = dict(w_fmt="fp8", w_bits=8, w_gran="channel")
_preset("w8a8-fp8", "FP8 E4M3 per-channel weights + FP8 dynamic per-token activations "
        "(act_gran=tensor: per sequence; act_mode=static: calibrated per tensor)", **_W_FP8,
        act_fmt="fp8", act_bits=8, act_mode="dynamic", act_gran="token")
_preset("kv-fp8", "FP8 E4M3 KV cache, one scale per token and head "
        "(k_gran=tensor,v_gran=tensor: static per-tensor scales as vLLM)", kv_fmt="fp8", kv_bits=8,
        k_gran="token", v_gran="token")
_preset("mxfp4", "MXFP4 weights (OCP MX: E2M1, E8M0 scale per 32)", w_fmt="mxfp4", w_bits=4)
_preset("w4a4-mxfp4", "MXFP4 weights + MXFP4 activations (scales per 32 channels of each token)",
        w_fmt="mxfp4", w_bits=4, act_fmt="mxfp4", act_bits=4, act_mode="dynamic", act_gran="token")
_preset("nvfp4", "NVFP4 weights (E2M1, E4M3 scale per 16, FP32 scale per tensor)", w_fmt="nvfp4", w_bits=4)
_preset("w4a4-nvfp4", "NVFP4 weights + NVFP4 activations (FP32 activation scale static per tensor)",
        w_fmt="nvfp4", w_bits=4, act_fmt="nvfp4", act_bits=4, act_mode="static", act_gran="tensor")
