"""``clip-residual[:tau=10|:max=...]``: clip the residual-state peak after every decoder layer.

After each decoder layer, every token whose residual-state norm exceeds the
bound is scaled down (direction kept) to the bound: ``tau`` x the median norm
of the window's tokens at that layer, or the absolute ``max`` when given
(``max`` wins over ``tau``).  In practice that is the sink token(s): the
residual-state peak is ~160x the median on smollm2-135m.  Per layer the record
says how many token states were clipped, how many of them at position 0, and
the largest norm before and after.  Run it with ``--scheme fp32`` to see what
clipping alone costs the float model (Sun et al. 2024: the model needs its
massive activations).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from . import Env, Mitigation, register
from ..hooks import attach, hidden_of, layer_sites, with_hidden


def clip_norms(h: torch.Tensor, tau: float | None, bound: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale rows of ``h`` (B, T, C) whose norm exceeds the bound down to it -> (clipped h, clipped mask (B, T))."""
    norms = h.float().norm(dim=-1)  # (B, T)
    if bound is None:
        limit = tau * norms.median(dim=-1, keepdim=True).values  # (B, 1)
    else:
        limit = torch.full_like(norms[:, :1], bound)  # (B, 1)
    scale = (limit / norms.clamp_min(1e-12)).clamp(max=1.0)  # (B, T)
    return (h.float() * scale[..., None]).to(h.dtype), scale < 1.0


@dataclass(frozen=True)
class ClipResidual(Mitigation):
    tau: float = 10.0
    max: float | None = None

    def __post_init__(self) -> None:
        if self.tau <= 0 or (self.max is not None and self.max <= 0):
            raise ValueError("tau and max must be > 0")

    def describe(self) -> str:
        return (f"token states with norm > {self.max:g} (absolute)" if self.max is not None
                else f"token states with norm > {self.tau:g} x the window's median norm")

    @contextmanager
    def attach(self, model: Any, env: Env) -> Iterator[None]:
        per_layer: dict[str, dict[str, Any]] = {}

        def hook(name: str) -> Any:
            def clip(output: Any) -> Any:
                h = hidden_of(output)  # (B, T, C)
                clipped_h, mask = clip_norms(h, self.tau, self.max)
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


register(ClipResidual(name="clip-residual"), "after each decoder layer, clip token states whose residual "
         "norm exceeds tau x the median (or max) to that bound; recorded per layer")
