"""``smooth[:alpha=0.5]``: SmoothQuant's scale migration (Xiao et al. 2023), calibrated on the calibration windows.

For every module whose output is the input of one or more quantized Linears
(found by tensor identity in a short traced forward: in Llama/Qwen/Gemma the
norms before q/k/v and before gate/up), per input channel ``j``:
``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` (activation absmax over the
calibration windows, weight absmax over the group's Linears).  The producer's
output is divided by ``s`` (folded into its ``weight`` when that is exact,
otherwise through a small output-scaling wrapper) and the Linears' weight
columns are multiplied by ``s``: the float model computes the same function.
That is checked on a calibration window (max logit difference, recorded); a
model where it does not hold is refused.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import QuantsinkError
from quantsink.hooks.sites import Hook, attach
from ..schemes import default_filter
from . import Env, Mitigation, register, require_linear_scheme


class ScaledOutput(torch.nn.Module):
    """``module(x) / s``: where the division cannot be folded into ``module.weight``."""

    def __init__(self, module: torch.nn.Module, inv_scale: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("inv_scale", inv_scale)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs) * self.inv_scale


def smoothing_scale(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel ``s = a^alpha / w^(1-alpha)``; 1 where either is 0.  (C,)"""
    s = act_max.float().pow(alpha) / weight_max.float().pow(1 - alpha)
    return torch.where((act_max > 0) & (weight_max > 0), s, torch.ones_like(s)).clamp(1e-5, 1e5)


@torch.no_grad()
def find_groups(model: Any, ids: torch.Tensor) -> dict[str, list[str]]:
    """``{producer fqn: [Linear fqn, ...]}``: leaf modules whose output tensor is a quantized Linear's input."""
    made: dict[int, tuple[str, torch.Tensor]] = {}
    used: dict[str, torch.Tensor] = {}
    linears = {fqn: m for fqn, m in model.named_modules() if fqn and default_filter(m, fqn)}
    leaves = [(fqn, m) for fqn, m in model.named_modules()
              if fqn and not list(m.children()) and fqn not in linears and hasattr(m, "weight")]

    def produced(fqn: str) -> Hook:
        return Hook(lambda out: made.__setitem__(id(out), (fqn, out)) if torch.is_tensor(out) else None)

    def consumed(fqn: str) -> Hook:
        return Hook(lambda x: used.__setitem__(fqn, x), "input")

    hooks = {**{f: produced(f) for f, _ in leaves}, **{f: consumed(f) for f in linears}}
    with attach(model, hooks, known=dict(model.named_modules())):
        model(input_ids=ids, use_cache=False)
    groups: dict[str, list[str]] = defaultdict(list)
    for fqn, x in used.items():
        hit = made.get(id(x))
        if hit is not None and hit[1] is x:
            groups[hit[0]].append(fqn)
    return dict(groups)


@torch.no_grad()
def activation_absmax(model: Any, linears: list[str], windows: Any) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each Linear over ``windows``.  {fqn: (C,)}"""
    amax: dict[str, torch.Tensor] = {}

    def grab(fqn: str) -> Hook:
        def hook(x: torch.Tensor) -> None:
            a = x.detach().abs().flatten(0, -2).amax(0).float()  # (C,)
            amax[fqn] = torch.maximum(amax[fqn], a) if fqn in amax else a
        return Hook(hook, "input")

    device = model.get_input_embeddings().weight.device
    with attach(model, {f: grab(f) for f in linears}, known=dict(model.named_modules())):
        for row in range(len(windows)):
            part = windows.subset(slice(row, row + 1))
            model(input_ids=part.input_ids.to(device), attention_mask=part.attention_mask.to(device),
                  use_cache=False)
    return amax


def _fold(model: Any, producer: str, s: torch.Tensor, probe: torch.Tensor) -> str:
    """Divide ``producer``'s output by ``s``: in its weight when exact on ``probe``, else wrapped."""
    module = model.get_submodule(producer)
    with torch.no_grad():
        before = module(probe)
        weight = module.weight.data.clone()
        module.weight.data = (weight / s.to(weight)).to(weight.dtype)
        after = module(probe)
        if torch.allclose(after * s.to(after), before, rtol=1e-4, atol=1e-5 * float(before.abs().max())):
            return "weight"
        module.weight.data = weight
    parent, _, child = producer.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, ScaledOutput(module, (1 / s).to(weight)))
    return "wrapper"


@dataclass(frozen=True)
class Smooth(Mitigation):
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")

    def check(self, scheme: Any) -> None:
        require_linear_scheme("smooth", scheme)

    @torch.no_grad()
    def prepare(self, model: Any, env: Env) -> Any:
        windows = env.calibration()
        device = model.get_input_embeddings().weight.device
        first = windows.subset(slice(0, 1))
        groups = find_groups(model, first.input_ids[:, :16].to(device))
        if not groups:
            raise QuantsinkError("smooth: found no module whose output feeds the quantized Linears; "
                                 "this model cannot be smoothed generically")
        logits = model(input_ids=first.input_ids.to(device), use_cache=False).logits.float()  # (1, T, V)
        amax = activation_absmax(model, [f for fs in groups.values() for f in fs], windows)
        folded = {}
        for producer, linears in groups.items():
            mods = [model.get_submodule(f) for f in linears]
            wmax = torch.stack([m.weight.detach().abs().amax(0).float() for m in mods]).amax(0)  # (C,)
            amx = torch.stack([amax[f] for f in linears]).amax(0)  # (C,)
            s = smoothing_scale(amx.to(wmax.device), wmax, self.alpha)
            probe = torch.randn(2, 3, s.numel(), device=device, dtype=mods[0].weight.dtype)
            folded[producer] = _fold(model, producer, s, probe)
            for m in mods:
                m.weight.data = (m.weight.data.float() * s.to(m.weight.device)).to(m.weight.dtype)
        diff = float((model(input_ids=first.input_ids.to(device), use_cache=False).logits.float() - logits).abs().max())
        scale = float(logits.abs().max())
        if diff > 1e-2 * scale:
            raise QuantsinkError(f"smooth changed the float model's logits by {diff:.3g} (max |logit| {scale:.3g}): "
                                 f"a smoothed module's output is used elsewhere; this model cannot be smoothed")
        env.notes.update(groups={p: ls for p, ls in groups.items()}, folded_into=folded,
                         calibration_windows=len(windows), float_max_logit_diff=diff)
        if not env.scheme.quantizes_activations:
            env.notes["note"] = ("no-op in effect: the scheme quantizes no Linear inputs, and smoothing leaves "
                                 "every Linear's output (so the K/V values) unchanged up to float rounding")
        return model


register(Smooth(name="smooth"), "SmoothQuant scale migration (alpha) from activations into weights, "
         "calibrated on the calibration windows")
