"""The paper's probes of a BB model, on a fixed probe batch (Guo et al. 2024, Sec. 3).

Protocol, per layer l and head h, over the probe batch (every sequence starts with ``<s>``):

* ``attn_sink``: mean attention weight on ``<s>`` (key 0) of the non-trigger query positions
  i >= 1 (the paper's ``Attn_<s>``; it also counts query 0, which can only attend to itself:
  a difference below 1/T).
* ``dormant_share``: share of those queries with weight on ``<s>`` >= 0.89 (the paper's dormant
  threshold); ``active_share``: share of trigger queries with weight on ``<s>`` < 0.89.
* ``value_norm_sink`` / ``value_norm_others``: ||v|| of the value state of ``<s>`` vs the mean over
  positions >= 1 (the paper's value-state drain); ``drain_norm_*``: the same for ||W_O v||.
* ``residual_norm_sink`` / ``residual_norm_others``: ||h|| of the block output (residual stream)
  at ``<s>`` vs the mean over positions >= 1 (the residual-state peak).
* ``loss`` (all positions), ``markov_loss`` (non-trigger queries: the bigram part),
  ``backcopy_loss`` (trigger queries), in nats per token.

Scalars for the summary: ``sink_layer`` is the layer with the highest mean ``attn_sink``;
``attn_sink``, ``value_norm_*`` and ``drain_norm_*`` are taken there (mean over heads);
``residual_norm_*`` at layer 0, where the paper reports the peak.
"""

from __future__ import annotations

from typing import Any

import torch

from quantsink.hooks import sites as hooks
from .data import BigramBackcopy

DORMANT = 0.89


def _attention_rows(weights: torch.Tensor, trigger: torch.Tensor) -> dict[str, list[float]]:
    """weights (B, H, T, T), trigger (B, T) bool -> per-head sink numbers."""
    on_sink = weights[..., 0].float()  # (B, H, T)
    plain = ~trigger.clone()
    plain[:, 0] = False  # query 0 has no choice
    plain = plain[:, None, :].expand_as(on_sink)  # (B, H, T)
    trig = trigger[:, None, :].expand_as(on_sink)  # (B, H, T)
    return {"attn_sink": _masked_mean(on_sink, plain),
            "dormant_share": _masked_mean((on_sink >= DORMANT).float(), plain),
            "active_share": _masked_mean((on_sink < DORMANT).float(), trig)}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """(B, H, T) values, mask -> per-head mean over the masked entries (NaN when none)."""
    total = (values * mask).sum((0, 2))  # (H,)
    count = mask.sum((0, 2)).clamp(min=1)  # (H,)
    means = total / count
    means[mask.sum((0, 2)) == 0] = float("nan")
    return means.tolist()


def _sink_vs_others(norms: torch.Tensor) -> tuple[Any, Any]:
    """norms (B, T, ...) -> (mean at position 0, mean over positions >= 1), each (...)."""
    return norms[:, 0].mean(0).tolist(), norms[:, 1:].mean((0, 1)).tolist()


def _value_rows(v: torch.Tensor, out_proj: torch.nn.Module, heads: int) -> dict[str, Any]:
    """v (B, T, H*D) -> ||v|| and ||W_O v|| per head, sink vs others."""
    b, t, hd = v.shape
    per_head = v.float().view(b, t, heads, hd // heads)  # (B, T, H, D)
    w = out_proj.weight.float().view(-1, heads, hd // heads)  # (C, H, D)
    written = torch.einsum("bthd,chd->bthc", per_head, w)  # (B, T, H, C)
    value_sink, value_others = _sink_vs_others(per_head.norm(dim=-1))
    drain_sink, drain_others = _sink_vs_others(written.norm(dim=-1))
    return {"value_norm_sink": value_sink, "value_norm_others": value_others,
            "drain_norm_sink": drain_sink, "drain_norm_others": drain_others}


def _losses(logits: torch.Tensor, targets: torch.Tensor, trigger: torch.Tensor) -> dict[str, float]:
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
    return {"loss": float(nll.mean()), "markov_loss": float(nll[~trigger].mean()),
            "backcopy_loss": float(nll[trigger].mean()) if trigger.any() else float("nan")}


@torch.no_grad()
def probe(model: Any, task: BigramBackcopy, seqs: torch.Tensor) -> dict[str, Any]:
    """The probes on ``seqs`` (B, T+1): inputs ``seqs[:, :-1]``, targets ``seqs[:, 1:]``."""
    ids, targets = seqs[:, :-1], seqs[:, 1:]  # (B, T), (B, T)
    trigger = torch.as_tensor(task.trigger_mask(ids.cpu()), device=ids.device)  # (B, T)
    found = hooks.sites(model)
    n_layers = len(hooks.find_blocks(model))
    seen: dict[str, Any] = {}

    def keep(name: str) -> hooks.Hook:
        return hooks.Hook(lambda value: seen.__setitem__(name, value))

    def rows(name: str) -> hooks.Hook:  # one batch row at a time, in a buffer valid during the call only
        return hooks.Hook(lambda probs, row: seen.setdefault(name, []).append(probs.clone()), "attention")

    wanted = {name: rows(name) if name.endswith(".attn") else keep(name) for name in found
              if name.startswith("layers.") and (name.count(".") == 1 or name.endswith((".attn", ".v_proj")))}
    was_training = model.training
    model.eval()
    try:
        with hooks.attach(model, wanted, known=found):
            logits = model(ids).logits  # (B, T, V)
    finally:
        model.train(was_training)
    layers = [_layer(seen, found, i, trigger, model.config.num_attention_heads) for i in range(n_layers)]
    return {**_losses(logits, targets, trigger), "layers": layers}


def _layer(seen: dict[str, Any], found: dict[str, Any], i: int, trigger: torch.Tensor, heads: int) -> dict[str, Any]:
    h = hooks.hidden_of(seen[f"layers.{i}"])  # (B, T, C)
    residual_sink, residual_others = _sink_vs_others(h.float().norm(dim=-1))
    v = hooks.hidden_of(seen[f"layers.{i}.attn.v_proj"])  # (B, T, H*D)
    attn = found[f"layers.{i}.attn"]
    out_proj = getattr(attn, "out_proj", None) or attn.o_proj  # OPT / Llama naming
    weights = torch.cat(seen[f"layers.{i}.attn"])  # (B, H, T, T): the kernel's own (eager, ReLU) or softmax beside it
    return {"residual_norm_sink": residual_sink, "residual_norm_others": residual_others,
            **_attention_rows(weights, trigger), **_value_rows(v, out_proj, heads)}


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalars of one probe (see the module docstring for where each is taken)."""
    layers = metrics["layers"]
    heads_mean = lambda row: sum(row) / len(row)  # noqa: E731
    sink_layer = max(range(len(layers)), key=lambda i: heads_mean(layers[i]["attn_sink"]))
    at = layers[sink_layer]
    return {"loss": metrics["loss"], "markov_loss": metrics["markov_loss"], "backcopy_loss": metrics["backcopy_loss"],
            "sink_layer": sink_layer, "attn_sink": heads_mean(at["attn_sink"]),
            "dormant_share": heads_mean(at["dormant_share"]),
            "value_norm_sink": heads_mean(at["value_norm_sink"]), "value_norm_others": heads_mean(at["value_norm_others"]),
            "drain_norm_sink": heads_mean(at["drain_norm_sink"]), "drain_norm_others": heads_mean(at["drain_norm_others"]),
            "residual_norm_sink": layers[0]["residual_norm_sink"], "residual_norm_others": layers[0]["residual_norm_others"]}
