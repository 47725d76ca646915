"""``sink-fp[:k=1|detect]``: keep the sink positions in full precision (PrefixQuant / KVQuant idea).

The scheme leaves the chosen sequence positions out of activation and KV
quantization and out of static calibration ranges (``QuantContext.keep_fp_positions``).
``k=N`` keeps positions ``0..N-1`` of every window (after any prepended sink
token, so with ``sink-token`` position 0 is that token).  ``k=detect`` finds the
extreme tokens from data: positions whose residual-state peak (max over layers
of ``||h_t|| / median_t' ||h_t'||``, float reference) exceeds ``ratio`` in at
least half of the first ``detect_windows`` calibration windows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import UsageError
from . import Env, Mitigation, register
from ..hooks import attach, hidden_of, layer_sites


def require_token_scheme(mitigation: str, scheme: Any) -> None:
    if not scheme.quantizes_tokens:
        raise UsageError(f"{mitigation} keeps positions in full precision in activation/KV quantization, but "
                         f"scheme {scheme.name!r} has no such quantization that can keep positions; use a "
                         f"simulated activation or KV scheme (e.g. w8a8, w8a8-dyn, w8a8-tok, kv4)")


def peak_ratio(norms: torch.Tensor) -> torch.Tensor:
    """Residual-state peak per position: ``norm / median norm of the window``.  (L, B, T) -> (B, T), max over L."""
    median = norms.median(dim=-1, keepdim=True).values  # (L, B, 1)
    return (norms / median.clamp_min(1e-12)).amax(0)  # (B, T)


def residual_norms(model: Any, into: list[torch.Tensor]) -> Any:
    """Collect the norm of every decoder layer's output residual state, (B, T) per layer (a context)."""
    def grab(output: Any) -> None:
        into.append(hidden_of(output).float().norm(dim=-1).cpu())  # (B, T)

    layers = layer_sites(model)
    return attach(model, {name: grab for name in layers}, known=layers)


@torch.inference_mode()
def detect_extreme_positions(model: Any, windows: Any, ratio: float) -> tuple[list[int], dict[str, float]]:
    """Positions whose peak ratio exceeds ``ratio`` in at least half of ``windows`` (float forward)."""
    norms: list[torch.Tensor] = []
    device = model.get_input_embeddings().weight.device
    with residual_norms(model, norms):
        model(input_ids=windows.input_ids.to(device), attention_mask=windows.attention_mask.to(device),
              use_cache=False)
    peaks = peak_ratio(torch.stack(norms))  # (B, T)
    share = (peaks > ratio).float().mean(0)  # (T,)
    positions = [int(p) for p in (share >= 0.5).nonzero()[:, 0]]
    return positions, {str(p): round(float(peaks[:, p].median()), 2) for p in positions}


@dataclass(frozen=True)
class SinkFP(Mitigation):
    k: int | Literal["detect"] = 1
    ratio: float = 20.0
    detect_windows: int = 4

    def __post_init__(self) -> None:
        if self.k != "detect" and self.k < 1:
            raise ValueError("k must be >= 1 or 'detect'")
        if self.ratio <= 1 or self.detect_windows < 1:
            raise ValueError("ratio must be > 1 and detect_windows >= 1")

    def check(self, scheme: Any) -> None:
        require_token_scheme("sink-fp", scheme)

    def positions(self, env: Env) -> list[int]:
        if self.k != "detect":
            env.notes["positions"] = list(range(self.k))
            return env.notes["positions"]
        windows = env.calibration().subset(slice(0, self.detect_windows))
        positions, peaks = detect_extreme_positions(env.reference, windows, self.ratio)
        env.notes.update(positions=positions, peak_ratio=peaks, detected_on=f"{len(windows)} calibration windows")
        return positions

    def quant_context(self, ctx: Any, env: Env) -> Any:
        keep = sorted(set(ctx.keep_fp_positions) | set(self.positions(env)))
        env.notes["how"] = "scheme keeps these positions in full precision and out of calibration ranges"
        return dataclasses.replace(ctx, keep_fp_positions=tuple(keep))


register(SinkFP(name="sink-fp"), "keep the first k (or detected extreme) positions in full precision "
         "in activation/KV quantization and out of calibration ranges")
