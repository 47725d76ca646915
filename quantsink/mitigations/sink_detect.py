"""``sink-fp:k=detect``: sink tokens predicted anywhere in each window from stable outlier channels at one
early layer, kept in full precision (KVSink, arXiv 2508.04257).

Calibration (the float reference on the first ``detect_windows`` calibration windows):

1. the detection layer: ``layer`` when given, else the first decoder layer at whose output some position's
   residual-state norm exceeds ``ratio`` x the window's median norm in at least half of the windows;
2. the stable outlier channels: per window, the ``channels`` channels with the largest |activation| over that
   layer's extreme positions (norm ratio > ``ratio``) that exceed ``ratio`` x the window's median |activation|;
   kept are those found in at least half the windows.

Prediction, for every forward of the quantized model (calibration forwards included): the float reference
runs up to the detection layer on the same input ids (a partial forward: layer+1 of L layers), and a position
is a sink when its largest |activation| over the stable channels exceeds ``ratio`` x the median of that score
over the window's positions.  Those positions' activations, keys and values stay in full precision and out
of every range (``QuantContext.keep_fp``).  KVSink reads the quantized model's own early-layer state; the float
reference's is used here (the same up to the quantization error of the first layers).  The record says, per
evaluation window, how many positions were kept and where (``applied.kept``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from quantsink.hooks.sites import attach, hidden_of, layer_sites

MAX_LISTED = 32  # positions listed per window in the record


class _Stop(Exception):
    pass


def residual_norms(model: Any, into: list[torch.Tensor]) -> Any:
    """Collect the norm of every decoder layer's output residual state, (B, T) per layer (a context)."""
    def grab(output: Any) -> None:
        into.append(hidden_of(output).float().norm(dim=-1).cpu())  # (B, T)

    layers = layer_sites(model)
    return attach(model, {name: grab for name in layers}, known=layers)


@torch.no_grad()
def layer_state(model: Any, ids: torch.Tensor, layer: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The residual state after decoder layer ``layer``; the forward stops there.  (B, T, C)"""
    got: list[torch.Tensor] = []

    def grab(output: Any) -> None:
        got.append(hidden_of(output))
        raise _Stop

    device = model.get_input_embeddings().weight.device
    name = f"layers.{layer}"
    try:
        with attach(model, {name: grab}, known={name: layer_sites(model)[name]}):
            model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
                  use_cache=False)
    except _Stop:
        pass
    return got[0].float()


def first_extreme_layer(norms: torch.Tensor, ratio: float) -> int | None:
    """The first layer where some position's norm exceeds ``ratio`` x the median in >= half the windows.
    (L, B, T) -> layer index or None"""
    ratios = norms / norms.median(-1, keepdim=True).values.clamp_min(1e-12)  # (L, B, T)
    hit = ((ratios > ratio).any(-1).float().mean(-1) >= 0.5).nonzero()  # (L,) windows share
    return int(hit[0, 0]) if len(hit) else None


def stable_channels(h: torch.Tensor, ratio: float, top: int) -> list[int]:
    """Channels among the ``top`` largest |h| of the extreme positions (and > ``ratio`` x the window's median |h|)
    in >= half the windows.  (B, T, C)"""
    norms = h.norm(dim=-1)  # (B, T)
    extreme = norms > ratio * norms.median(-1, keepdim=True).values  # (B, T)
    counts = torch.zeros(h.shape[-1])
    rows = [b for b in range(len(h)) if extreme[b].any()]
    for b in rows:
        peak = h[b][extreme[b]].abs().amax(0)  # (C,)
        top_b = peak.topk(min(top, h.shape[-1])).indices
        counts[top_b[peak[top_b] > ratio * h[b].abs().median()]] += 1  # outliers only, not the top's tail
    keep = (counts >= max(1, len(h) / 2)).nonzero()[:, 0]
    return sorted(keep.tolist(), key=lambda c: -counts[c])


def predict(h: torch.Tensor, channels: list[int], ratio: float) -> torch.Tensor:
    """Sink positions: score (max |h| over ``channels``) > ``ratio`` x the window's median score.
    (B, T, C) -> (B, T)"""
    score = h[..., channels].abs().amax(-1)  # (B, T)
    return score > ratio * score.median(-1, keepdim=True).values.clamp_min(1e-12)


@dataclass
class Detector:
    """The calibrated rule, and the positions it kept in each row of the current attachment's forwards."""

    reference: Any
    layer: int
    channels: list[int]
    ratio: float
    kept: list[list[int]] = field(default_factory=list)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T) bool
        if not self.channels:
            return torch.zeros(ids.shape, dtype=torch.bool)
        mask = predict(layer_state(self.reference, ids, self.layer), self.channels, self.ratio).cpu()
        self.kept.extend(row.nonzero()[:, 0].tolist() for row in mask)
        return mask

    def record(self) -> dict[str, Any]:
        counts = [len(r) for r in self.kept]
        return {"windows": len(counts), "kept_per_window": counts, "positions": [r[:MAX_LISTED] for r in self.kept],
                "mean_kept": sum(counts) / max(1, len(counts)),
                "windows_keeping_position_0": sum(1 for r in self.kept if 0 in r),
                "windows_keeping_beyond_0": sum(1 for r in self.kept if any(p > 0 for p in r))}


def calibrate(reference: Any, windows: Any, ratio: float, layer: int | None, top: int) -> tuple[Detector, dict]:
    """The detector of the module doc, from the float reference on ``windows``."""

    norms: list[torch.Tensor] = []
    device = reference.get_input_embeddings().weight.device
    with torch.no_grad(), residual_norms(reference, norms):
        reference(input_ids=windows.input_ids.to(device), attention_mask=windows.attention_mask.to(device),
                  use_cache=False)
    found = first_extreme_layer(torch.stack(norms), ratio) if layer is None else layer
    if found is None:
        return Detector(reference, 0, [], ratio), {"layer": None, "channels": [],
                                                   "why": f"no layer has a position with norm > {ratio:g} x the "
                                                          f"median in half the windows: nothing is kept"}
    h = layer_state(reference, windows.input_ids, found, windows.attention_mask)  # (B, T, C)
    channels = stable_channels(h, ratio, top)
    detector = Detector(reference, found, channels, ratio)
    on_calib = predict(h, channels, ratio) if channels else torch.zeros(h.shape[:2], dtype=torch.bool)
    return detector, {"layer": found, "layer_chosen": "given" if layer is not None else "first extreme layer",
                      "channels": channels, "calibration_windows": len(windows),
                      "predicted_on_calibration": [r.nonzero()[:, 0].tolist()[:MAX_LISTED] for r in on_calib.cpu()]}


def combine(first: Any, second: Any) -> Any:
    """Two ``keep_fp`` callables as one (either keeps a position)."""
    return second if first is None else (lambda ids: first(ids).to(torch.bool).cpu() | second(ids))


@contextmanager
def evaluation(detector: Detector | None, notes: dict[str, Any]) -> Iterator[None]:
    """The forwards of one attachment: what was kept lands in ``notes["kept"]`` at the end.  A run attaches
    twice, for calibration then for the evaluation pass: an earlier ``kept`` moves to ``kept_calibration``."""
    if detector is None:
        yield
        return
    detector.kept = []
    try:
        yield
    finally:
        if "kept" in notes:
            notes["kept_calibration"] = notes["kept"]
        notes["kept"] = detector.record()
