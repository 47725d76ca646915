"""Simulated (fake) quantization: weights + activations + KV cache, each optional.

No CPU kernel library offers int8/int4 activation and KV-cache quantization in
the forms we need, so, as LLMC, QuaRot, SmoothQuant and qllm-eval evaluate them,
tensors are quantized and immediately de-quantized (``quant.fake_quant``) and the
matmuls run in the model's float dtype.  Every record says ``simulated: true``.

Where each part acts (small wrapper modules, optimum-quanto style):

* weights: each ``ctx.filter_fn``-selected ``nn.Linear`` (default: all but
  ``lm_head``) becomes a ``QuantLinear`` holding its fake-quantized weight;
* activations: ``QuantLinear.input_quantizer`` quantizes the Linear's input
  (site ``<fqn>.input_quantizer``, e.g. ``model.layers.3.mlp.down_proj.input_quantizer``:
  a stats hook there sees the quantized activations);
* KV cache: values at the ``v_proj`` output; keys (``kv_keys``) at the ``k_proj`` output,
  before any ``k_norm`` and the rotary embedding (``pre-rope``, the default), or as the attention
  sees them, after ``k_norm`` and RoPE (``post-rope``, as engines cache them; see ``kv_sites``).

Positions that ``ctx`` keeps in full precision (``keep_fp_positions`` / ``keep_fp``)
pass through every activation and KV quantizer unchanged and are left out of
dynamic ranges and static calibration ranges.

Speed: weights are quantized once, when the scheme is applied; Linears that read
the same tensor (``q/k/v_proj``, ``gate/up_proj``) with the same quantizer settings
quantize it once (``SharedInput``), and a static quantizer's scale is computed
once per calibrated range.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from ..errors import QuantsinkError, UsageError
from quantsink.hooks.sites import Hook
from quantsink.schemes.quant import fake_quant, keep_rows, qparams, quant_dequant
from . import QuantContext, Scheme, register
from .kv_sites import key_norm_note, post_rope


class KeepFp:
    """Shared by every quantizer of one model: the ``(B, T)`` keep mask of the current forward,
    set from the model's input ids by a hook on the model's call (``QuantContext.hooks``)."""

    def __init__(self, mask_fn: Any):
        self.mask_fn = mask_fn
        self.mask: torch.Tensor | None = None
        self.shape: tuple[int, ...] | None = None  # (B, T) of the current forward
        self.inputs = SharedInput()  # Linear inputs quantized so far, shared by the input quantizers

    def hook(self, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.2x names it `cache`
        offset = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        self.mask = None if ids is None else self.mask_fn(ids, offset)
        self.shape = None if ids is None else tuple(ids.shape)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(B, T, C)``: OPT-style decoders flatten the tokens to ``(B*T, C)`` before the MLP."""
        shape = self.shape
        if x.dim() == 2 and shape is not None and len(shape) == 2 and x.shape[0] == shape[0] * shape[1]:
            return x.view(*shape, x.shape[-1])
        return x

    def rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask when it matches ``x``'s ``(B, T)`` (else None)."""
        mask = self.mask
        return mask.to(x.device) if mask is not None and mask.shape == x.shape[:-1] else None


class SharedInput:
    """The last tensor some Linear's input quantizer saw and its quantized values, per settings:
    Linears fed the same tensor object (q/k/v, gate/up) quantize it once.  Holding the tensor
    keeps its identity from being reused; inputs are never modified in place during a forward."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.out: dict[tuple[Any, ...], torch.Tensor] = {}

    def get(self, x: torch.Tensor, key: tuple[Any, ...], quantize: Callable[[], torch.Tensor]) -> torch.Tensor:
        if x is not self.x:
            self.x, self.out = x, {}
        if key not in self.out:
            self.out[key] = quantize()
        return self.out[key]


class ActQuantizer(nn.Module):
    """Input quantizer of a Linear: dynamic (per sequence or per token) or static per-tensor."""

    def __init__(self, bits: int, sym: bool, mode: str, gran: str, keep: KeepFp):
        super().__init__()
        self.bits, self.sym, self.mode, self.gran, self.keep = bits, sym, mode, gran, keep
        self.shared = getattr(keep, "inputs", None) or SharedInput()  # one per model, with the keep mask
        self.observing = False
        self.register_buffer("lo", torch.tensor(0.0))  # static range, 0 included
        self.register_buffer("hi", torch.tensor(0.0))
        self.calibrated = False
        self._static: tuple[Any, ...] = ()  # (lo, hi, (lo, hi) as floats, scale, zero) of the last range

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) or (B*T, C)
        return self._quantize(self.keep.tokens(x)).reshape(x.shape)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        keep = self.keep.rows(x)  # (B, T) or None
        if self.observing:
            masked = x if keep is None else x.masked_fill(keep[..., None], 0)
            self.lo = torch.minimum(self.lo, masked.min().float())
            self.hi = torch.maximum(self.hi, masked.max().float())
            return x
        if self.mode == "dynamic":
            gran = {"tensor": "tensor", "token": "row"}[self.gran]
            return self.shared.get(x, (self.bits, self.sym, gran),
                                   lambda: fake_quant(x, self.bits, sym=self.sym, gran=gran, keep=keep))
        if not self.calibrated:
            raise QuantsinkError("static activation quantizer used before calibration")
        _, _, bounds, scale, zero = self.static_qparams()
        return self.shared.get(x, (self.bits, self.sym, bounds), lambda: self._static_quant(x, scale, zero, keep))

    def static_qparams(self) -> tuple[Any, ...]:
        """``(lo, hi, bounds, scale, zero)``, recomputed only when the range tensors change."""
        if not self._static or self._static[0] is not self.lo or self._static[1] is not self.hi:
            bounds = (float(self.lo), float(self.hi))
            self._static = (self.lo, self.hi, bounds, *qparams(self.lo, self.hi, self.bits, self.sym))
        return self._static

    def _static_quant(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      keep: torch.Tensor | None) -> torch.Tensor:
        out = quant_dequant(x, scale, zero, self.bits, self.sym)
        return out if keep is None else keep_rows(out, x, keep)

    def extra_repr(self) -> str:
        return f"int{self.bits} {'sym' if self.sym else 'asym'} {self.mode} per-{self.gran}"


class KVQuantizer(nn.Module):
    """Output quantizer of k_proj / v_proj ``(B, T, H*D)``: per token (groups of ``group``
    channels, default one head) or per channel (over blocks of ``group`` tokens, default the window)."""

    def __init__(self, bits: int, sym: bool, gran: str, group: int | None, keep: KeepFp):
        super().__init__()
        self.bits, self.sym, self.gran, self.group, self.keep = bits, sym, gran, group, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H*D)
        gran = {"token": "row", "channel": "column"}[self.gran]
        return fake_quant(x, self.bits, sym=self.sym, gran=gran, group=self.group, keep=self.keep.rows(x))

    def extra_repr(self) -> str:
        return f"int{self.bits} {'sym' if self.sym else 'asym'} per-{self.gran} group={self.group}"


class QuantLinear(nn.Linear):
    """A Linear with a fake-quantized weight, an ``input_quantizer`` and an ``output_quantizer``."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias
        self.input_quantizer: nn.Module = nn.Identity()
        self.output_quantizer: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(nn.functional.linear(self.input_quantizer(x), self.weight, self.bias))


def quantizers(model: nn.Module, kind: type = nn.Module) -> dict[str, nn.Module]:
    """``{fqn: quantizer}`` of every activation / KV quantizer in ``model`` (of type ``kind``)."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, (ActQuantizer, KVQuantizer))
            and isinstance(m, kind)}


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules found generically: those with ``k_proj`` and ``v_proj`` Linear children."""
    return [(fqn, m) for fqn, m in model.named_modules()
            if isinstance(getattr(m, "k_proj", None), nn.Linear) and isinstance(getattr(m, "v_proj", None), nn.Linear)]


def head_dim(model: nn.Module, attention: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(attention, "head_dim", None) or getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Simulated(Scheme):
    """Composed fake quantization; ``None`` bits leave a part in float.

    Weights: ``w_gran`` channel (one range per output channel), group (blocks of
    ``w_group`` input channels) or tensor.  Activations (Linear inputs): dynamic
    per-tensor (one range per sequence), dynamic per-token, or static per-tensor
    (ranges calibrated on the calibration windows); per-token is always dynamic
    (``act_gran=token`` sets ``act_mode=dynamic``).  KV: keys (``k_gran``) and
    values (``v_gran``) per token (groups of ``kv_group`` channels, default one
    head) or per channel (blocks of ``kv_group`` tokens, default the window).
    """

    w_bits: int | None = None
    w_gran: Literal["channel", "group", "tensor"] = "channel"
    w_group: int = 128
    w_sym: bool = True
    act_bits: int | None = None
    act_mode: Literal["static", "dynamic"] = "dynamic"
    act_gran: Literal["tensor", "token"] = "tensor"
    act_sym: bool = True
    kv_bits: int | None = None
    k_gran: Literal["token", "channel"] = "token"
    v_gran: Literal["token", "channel"] = "token"
    kv_group: int | None = None
    kv_sym: bool = False
    kv_keys: Literal["pre-rope", "post-rope"] = "pre-rope"
    simulated: ClassVar[bool] = True
    backend: ClassVar[str] = "torch"

    def __post_init__(self) -> None:
        for part in ("w_bits", "act_bits", "kv_bits"):
            bits = getattr(self, part)
            if bits is not None and not 2 <= bits <= 8:
                raise ValueError(f"{part} must be in 2..8 (or none), got {bits}")
        if self.w_bits is None and self.act_bits is None and self.kv_bits is None:
            raise ValueError("nothing to quantize: set w_bits, act_bits or kv_bits")
        if self.act_gran == "token" and self.act_mode == "static":
            # a token's range is known only when the token arrives: per-token is always dynamic
            # (so `w8a8:act_gran=token` means dynamic per-token; the record shows act_mode=dynamic)
            object.__setattr__(self, "act_mode", "dynamic")
        if self.w_group < 1 or (self.kv_group is not None and self.kv_group < 1):
            raise ValueError("group sizes must be >= 1")

    @property
    def bits(self) -> float:
        return float(self.w_bits or 32)

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.act_bits is not None

    @property
    def quantizes_tokens(self) -> bool:  # type: ignore[override]
        return self.act_bits is not None or self.kv_bits is not None

    @property
    def bit_widths(self) -> dict[str, int | None]:
        return {"weights": self.w_bits, "activations": self.act_bits, "kv": self.kv_bits}

    def spec_key(self, key: str) -> str:
        """``group`` names the group size of the part this preset quantizes group-wise;
        ``key_gran`` / ``value_gran`` are ``k_gran`` / ``v_gran``."""
        if key != "group":
            return {"key_gran": "k_gran", "value_gran": "v_gran"}.get(key, key)
        grouped_w = self.w_bits is not None and self.w_gran == "group"
        if grouped_w and self.kv_bits is not None:
            return key  # ambiguous: build() will list w_group and kv_group
        return "w_group" if grouped_w else "kv_group"

    def backend_version(self) -> str:
        return torch.__version__

    def parts(self) -> dict[str, str | None]:
        sym = {True: "sym", False: "asym"}
        w = self.w_bits and (f"int{self.w_bits} {sym[self.w_sym]} per-{self.w_gran}"
                             + (f" g{self.w_group}" if self.w_gran == "group" else ""))
        scope = {("dynamic", "tensor"): " (one range per sequence)",
                 ("static", "tensor"): " (ranges from the calibration windows)"}.get((self.act_mode, self.act_gran), "")
        a = self.act_bits and (f"int{self.act_bits} {sym[self.act_sym]} {self.act_mode} per-{self.act_gran}{scope}"
                               " on the input of every selected Linear")
        groups = {"token": f"groups of {self.kv_group or 'head_dim'} channels",
                  "channel": f"over {f'blocks of {self.kv_group} tokens' if self.kv_group else 'the whole window'}"}
        kv = self.kv_bits and (f"int{self.kv_bits} {sym[self.kv_sym]}; keys per-{self.k_gran} ({groups[self.k_gran]}), "
                               f"values per-{self.v_gran} ({groups[self.v_gran]}); {key_site_doc(self.kv_keys)}")
        return {"weights": w or None, "activations": a or None, "kv": kv or None}

    def record(self) -> dict[str, Any]:
        return {**super().record(), "parts": self.parts()}

    def check_model(self, model: Any) -> None:
        """A per-token KV group must tile each head: it divides the head dim (so no group straddles heads)."""
        if not (self.kv_bits and self.kv_group) or "token" not in (self.k_gran, self.v_gran):
            return
        for fqn, attn in attention_modules(model)[:1]:
            dim, width = head_dim(model, attn), attn.k_proj.out_features
            if self.kv_group > width or dim % self.kv_group:
                raise UsageError(f"{self.spec()}: kv_group={self.kv_group} must divide the head dim ({dim}; "
                                 f"KV width {width}) so no group straddles two heads; use a divisor of {dim}")

    def apply(self, model: Any, ctx: QuantContext) -> Any:
        keep = KeepFp(ctx.keep_fp_mask)
        ctx.hooks.setdefault("model", []).append(Hook(keep.hook, "call"))
        wrapped = self._wrap_linears(model, ctx, keep)
        kv_sites = self._attach_kv(model, keep, ctx.hooks) if self.kv_bits else []
        if self.kv_bits:
            ctx.notes["keys"] = key_norm_note([attn for _, attn in attention_modules(model)], self.kv_keys)
        ctx.notes.update(quantized_modules=len(wrapped), kv_sites=len(kv_sites), simulated=True,
                         keep_fp_positions=list(ctx.keep_fp_positions), keep_fp_hook=ctx.keep_fp is not None,
                         parts=self.parts())
        return model

    def calibrate(self, model: Any, ctx: QuantContext) -> None:
        if self.needs_calibration():
            ctx.notes["calibration"] = calibrate(model, ctx)

    def needs_calibration(self) -> bool:
        return bool(self.act_bits and self.act_mode == "static")

    def reset_ranges(self, model: Any) -> None:
        reset_ranges(model)

    def act_quantizer(self, keep: KeepFp) -> nn.Module:
        return ActQuantizer(self.act_bits, self.act_sym, self.act_mode, self.act_gran, keep)

    def kv_quantizer(self, gran: str, group: int | None, keep: KeepFp) -> nn.Module:
        return KVQuantizer(self.kv_bits, self.kv_sym, gran, group, keep)

    def _wrap_linears(self, model: nn.Module, ctx: QuantContext, keep: KeepFp) -> list[str]:
        if not (self.w_bits or self.act_bits):
            return []
        targets = [(fqn, m) for fqn, m in model.named_modules() if fqn and ctx.filter_fn(m, fqn)
                   and isinstance(m, nn.Linear)]
        for fqn, lin in targets:
            q = wrap(model, fqn, lin)
            if self.w_bits:
                q.weight.data = self.quantize_weight(q.weight.data)
            if self.act_bits:
                q.input_quantizer = self.act_quantizer(keep).to(q.weight.device)  # range buffers follow the layer
        return [fqn for fqn, _ in targets]

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:  # (out, in)
        gran = {"channel": "row", "group": "row", "tensor": "tensor"}[self.w_gran]
        group = self.w_group if self.w_gran == "group" else None
        return fake_quant(w, self.w_bits, sym=self.w_sym, gran=gran, group=group)

    def _attach_kv(self, model: nn.Module, keep: KeepFp, hooks: dict[str, list[Any]]) -> list[str]:
        sites = []
        for fqn, attn in attention_modules(model):
            dim = head_dim(model, attn)
            groups = {"token": self.kv_group or dim}  # per token: groups of channels; else blocks of tokens
            for name, gran, place in (("k_proj", self.k_gran, KEY_SITES[self.kv_keys]),
                                      ("v_proj", self.v_gran, at_projection)):
                quantizer = self.kv_quantizer(gran, groups.get(gran, self.kv_group), keep)
                device = getattr(attn, name).weight.device
                sites.append(place(model, fqn, name, quantizer.to(device), dim, hooks))
        if not sites:
            raise QuantsinkError("KV quantization found no attention module with k_proj/v_proj Linear children; "
                                 "this model fuses its projections (not supported yet)")
        return sites


def wrap(model: nn.Module, fqn: str, linear: nn.Linear) -> QuantLinear:
    """Replace ``fqn`` by a ``QuantLinear`` (idempotent) and return it."""
    if isinstance(linear, QuantLinear):
        return linear
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    q = QuantLinear(linear, linear.weight.data)
    setattr(parent, child, q)
    return q


def at_projection(model: nn.Module, fqn: str, name: str, quantizer: nn.Module, dim: int,
                  hooks: dict[str, list[Any]]) -> str:
    """at the k_proj/v_proj outputs, so keys are quantized before any k_norm and before the rotary embedding"""
    wrap(model, f"{fqn}.{name}", getattr(model.get_submodule(fqn), name)).output_quantizer = quantizer
    return f"{fqn}.{name}.output_quantizer"


KEY_SITES = {"pre-rope": at_projection, "post-rope": post_rope}  # kv_keys -> where keys are quantized


def key_site_doc(kv_keys: str) -> str:
    """Where ``kv_keys`` puts the KV quantizers, in words (for the record)."""
    return " ".join((KEY_SITES[kv_keys].__doc__ or "").split())


@torch.inference_mode()
def calibrate(model: nn.Module, ctx: QuantContext, batch_tokens: int = 2048) -> dict[str, Any]:
    """Static ranges: run the calibration windows with every ActQuantizer observing
    (float activations; weights and KV already quantized; the caller attaches the run's
    hooks, mitigations included, so the ranges are those of the model as it is evaluated),
    then freeze the ranges."""
    if ctx.calibration is None:
        raise QuantsinkError("static activation quantization needs calibration windows (none were given)")
    windows = ctx.calibration()
    acts = quantizers(model, ActQuantizer)
    for q in acts.values():
        q.observing = True
    device = model.get_input_embeddings().weight.device
    ids = windows.input_ids  # (N, T)
    per = max(1, batch_tokens // ids.shape[1])
    try:
        for start in range(0, len(ids), per):
            rows = slice(start, start + per)
            model(input_ids=ids[rows].to(device), attention_mask=windows.attention_mask[rows].to(device),
                  use_cache=False, **skip_logits(model))
    finally:
        for q in acts.values():
            q.observing = False
            q.calibrated = True
    return {"windows": int(ids.shape[0]), "tokens": int(windows.attention_mask.sum()),
            "ids_sha256": hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16],
            "ranges": "per-tensor min/max over all calibration tokens (0 included), kept positions excluded",
            "observed_in": "float activations (weights and KV already quantized), every mitigation attached"}


def reset_ranges(model: nn.Module) -> None:
    """Every activation quantizer back to its uncalibrated state (range [0, 0], not calibrated)."""
    for q in quantizers(model, ActQuantizer).values():
        q.lo, q.hi = torch.zeros_like(q.lo), torch.zeros_like(q.hi)
        q.calibrated = False


def skip_logits(model: nn.Module) -> dict[str, Any]:
    """Forward kwargs that skip the output head where the model allows it (transformers'
    ``logits_to_keep``: logits of the last position only): a calibration forward needs the
    Linear inputs, not (B, T, vocab) logits (the head is 20-60% of the embedded models' FLOPs)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _preset(name: str, help: str, **fields: Any) -> None:
    register(Simulated(name=name, **fields), help + " (simulated)")


_W8 = dict(w_bits=8, w_gran="channel", w_sym=True)
_A8 = dict(act_bits=8, act_sym=True)
_KV = dict(k_gran="token", v_gran="token", kv_sym=False)
_preset("w8a8", "int8 per-channel weights + int8 static per-tensor activations", **_W8, **_A8,
        act_mode="static", act_gran="tensor")
_preset("w8a8-dyn", "int8 per-channel weights + int8 dynamic per-tensor activations", **_W8, **_A8,
        act_mode="dynamic", act_gran="tensor")
_preset("w8a8-tok", "int8 per-channel weights + int8 dynamic per-token activations", **_W8, **_A8,
        act_mode="dynamic", act_gran="token")
_preset("w4a16", "int4 asymmetric g128 weights only", w_bits=4, w_gran="group", w_group=128, w_sym=False)
_preset("w4a8", "int4 asymmetric g128 weights + int8 dynamic per-token activations", w_bits=4, w_gran="group",
        w_group=128, w_sym=False, **_A8, act_mode="dynamic", act_gran="token")
_preset("kv8", "int8 asymmetric per-token (per-head) KV cache", kv_bits=8, **_KV)
_preset("kv4", "int4 asymmetric per-token (per-head) KV cache", kv_bits=4, **_KV)
_preset("w8a8-kv8", "w8a8 (static per-tensor activations) + int8 KV cache", **_W8, **_A8, act_mode="static",
        act_gran="tensor", kv_bits=8, **_KV)
