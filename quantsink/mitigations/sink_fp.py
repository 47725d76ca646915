"""``sink-fp[:k=1|detect]``: keep the sink positions in full precision (PrefixQuant / KVQuant idea).

The scheme leaves the chosen sequence positions out of activation and KV
quantization and out of static calibration ranges (``QuantContext.keep_fp_positions``).
``k=N`` keeps positions ``0..N-1`` of every window (after any prepended sink
token, so with ``sink-token`` position 0 is that token).  ``k=detect`` predicts
the sink tokens of each window, anywhere in it, from stable outlier channels at
one early layer (KVSink; ``ratio``, ``detect_windows``, ``layer``, ``channels``:
see :mod:`quantsink.mitigations.sink_detect`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ContextManager, Literal

import torch

from ..errors import UsageError
from . import Env, Mitigation, register


def require_token_scheme(mitigation: str, scheme: Any) -> None:
    if not scheme.quantizes_tokens:
        raise UsageError(f"{mitigation} keeps positions in full precision in activation/KV quantization, but "
                         f"scheme {scheme.name!r} has no such quantization that can keep positions; use a "
                         f"simulated activation or KV scheme (e.g. w8a8, w8a8-dyn, w8a8-tok, kv4)")


def peak_ratio(norms: torch.Tensor) -> torch.Tensor:
    """Residual-state peak per position: ``norm / median norm of the window``.  (L, B, T) -> (B, T), max over L."""
    median = norms.median(dim=-1, keepdim=True).values  # (L, B, 1)
    return (norms / median.clamp_min(1e-12)).amax(0)  # (B, T)


@dataclass(frozen=True)
class SinkFP(Mitigation):
    k: int | Literal["detect"] = 1
    ratio: float = 20.0
    detect_windows: int = 4
    layer: int | None = None
    channels: int = 4

    def __post_init__(self) -> None:
        if self.k != "detect" and self.k < 1:
            raise ValueError("k must be >= 1 or 'detect'")
        if self.ratio <= 1 or self.detect_windows < 1 or self.channels < 1:
            raise ValueError("ratio must be > 1, detect_windows and channels >= 1")
        if self.layer is not None and self.layer < 0:
            raise ValueError("layer must be >= 0")

    def check(self, scheme: Any) -> None:
        require_token_scheme("sink-fp", scheme)

    def check_window(self, width: int) -> None:
        if isinstance(self.k, int) and self.k >= width:
            raise UsageError(f"sink-fp:k={self.k} keeps every position of a {width}-token window in full "
                             f"precision: nothing would be quantized; use k below {width}")

    def quant_context(self, ctx: Any, env: Env) -> Any:
        if self.k == "detect":
            return self.detect(ctx, env)
        env.notes["positions"] = list(range(self.k))
        keep = sorted(set(ctx.keep_fp_positions) | set(env.notes["positions"]))
        env.notes["how"] = "scheme keeps these positions in full precision and out of calibration ranges"
        return dataclasses.replace(ctx, keep_fp_positions=tuple(keep))

    def detect(self, ctx: Any, env: Env) -> Any:
        from .sink_detect import calibrate, combine

        windows = env.calibration().subset(slice(0, self.detect_windows))
        env.state["detector"], found = calibrate(env.reference, windows, self.ratio, self.layer, self.channels)
        env.notes.update(found, how="per window, predicted sink positions kept in full precision and out of "
                         "calibration ranges (KVSink)")
        return dataclasses.replace(ctx, keep_fp=combine(ctx.keep_fp, env.state["detector"]))

    def attach(self, model: Any, env: Env) -> ContextManager[Any]:
        from .sink_detect import evaluation

        return evaluation(env.state.get("detector"), env.notes)


register(SinkFP(name="sink-fp"), "keep the first k (or, k=detect, per window predicted sink) positions in full "
         "precision in activation/KV quantization and out of calibration ranges")
