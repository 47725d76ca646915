"""``clip-residual[:tau=10|:max=...][:target=sink|any]``: clip the residual-state peak after every decoder layer.

After each decoder layer, the first token's residual state (position 0: the
sink, i.e. BOS or a prepended sink token when the windows have one, else the
first token) is scaled down (direction kept) to the bound when its norm
exceeds it: ``tau`` x the median norm of the window's tokens at that layer, or
the absolute ``max`` when given (``max`` wins over ``tau``).  ``target=any``
clips every token above the bound instead (the residual-state peak is ~160x
the median on smollm2-135m, and other extreme tokens may exceed it too).  Per layer the record
says how many token states were clipped, how many of them at position 0, and
the largest norm before and after.  Run it with ``--scheme fp32`` to see what
clipping alone costs the float model (Sun et al. 2024: the model needs its
massive activations).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch

from . import Env, Mitigation, register
from quantsink.hooks.sites import attach, hidden_of, layer_sites, with_hidden


def clip_norms(h: torch.Tensor, tau: float | None, bound: float | None,
               sink_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale rows of ``h`` (B, T, C) whose norm exceeds the bound down to it (only position 0 with
    ``sink_only``) -> (clipped h, clipped mask (B, T))."""
    norms = h.float().norm(dim=-1)  # (B, T)
    if bound is None:
        limit = tau * norms.median(dim=-1, keepdim=True).values  # (B, 1)
    else:
        limit = torch.full_like(norms[:, :1], bound)  # (B, 1)
    scale = (limit / norms.clamp_min(1e-12)).clamp(max=1.0)  # (B, T)
    if sink_only:
        scale[:, 1:] = 1.0
    return (h.float() * scale[..., None]).to(h.dtype), scale < 1.0


@dataclass(frozen=True)
class ClipResidual(Mitigation):
    tau: float = 10.0
    max: float | None = None
    target: Literal["sink", "any"] = "sink"

    def __post_init__(self) -> None:
        if self.tau <= 0 or (self.max is not None and self.max <= 0):
            raise ValueError("tau and max must be > 0")

    def describe(self) -> str:
        who = "the sink's (position 0) state" if self.target == "sink" else "token states"
        return (f"{who} with norm > {self.max:g} (absolute)" if self.max is not None
                else f"{who} with norm > {self.tau:g} x the window's median norm")

    @contextmanager
    def attach(self, model: Any, env: Env) -> Iterator[None]:
        per_layer: dict[str, dict[str, Any]] = {}

        def hook(name: str) -> Any:
            def clip(output: Any) -> Any:
                h = hidden_of(output)  # (B, T, C)
                clipped_h, mask = clip_norms(h, self.tau, self.max, sink_only=self.target == "sink")
                stats = per_layer.setdefault(name, {"clipped": 0, "clipped_at_0": 0, "peak_before": 0.0,
                                                    "peak_after": 0.0})
                stats["clipped"] += int(mask.sum())
                stats["clipped_at_0"] += int(mask[:, 0].sum())
                stats["peak_before"] = max(stats["peak_before"], float(h.float().norm(dim=-1).max()))
                stats["peak_after"] = max(stats["peak_after"], float(clipped_h.float().norm(dim=-1).max()))
                return with_hidden(output, clipped_h)
            return clip

        layers = layer_sites(model)
        try:
            with attach(model, {name: hook(name) for name in layers}, known=layers):
                yield
        finally:
            env.notes.update(clipped=self.describe(), per_layer=per_layer,
                             total_clipped=sum(s["clipped"] for s in per_layer.values()))


register(ClipResidual(name="clip-residual"), "after each decoder layer, clip the sink's (position 0) residual "
         "state to tau x the median norm (or max) when above it; target=any clips every token; recorded per layer")
