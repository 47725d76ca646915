"""Attention probabilities beside any attention kernel: eager's weights read from the module's output,
or, for SDPA and the rest, recomputed in float32 from the query and key the kernel is given, in blocks
and reused buffers, so the forward's own numbers never change."""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float | None = None, softcap: float | None = None,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = 128) -> torch.Tensor:
    """Attention probabilities as eager attention defines them, in float32.

    ``query`` (B, H, T, D) and ``key`` (B, KVH, S, D) as the attention kernel gets them (after
    rotary embedding and any cache); ``mask``: None (causal), bool (True attends) or additive,
    broadcastable to (B, H, T, S).  ``out``: two float32 buffers of B*H*T*S elements (scores,
    probabilities) reused across calls: a fresh multi-MB tensor per call costs more in page
    faults than the arithmetic.  Causal (``mask`` None): computed in blocks of ``block`` queries
    against the keys they can see only (5/8 of the work at T = 4 blocks).  -> (B, H, T, S)
    """
    (b, h, t, d), (kvh, s) = query.shape, key.shape[1:3]
    scores, probs = out if out is not None else [torch.empty(b * h * t * s, device=query.device) for _ in "sp"]
    q = query.float() * (scaling if scaling is not None else d ** -0.5)  # (B, H, T, D)
    k = key.float().transpose(2, 3)  # (B, KVH, D, S)
    probs = probs.view(b, h, t, s)
    spans = [(0, t, s)] if mask is not None else \
        [(a, min(a + block, t), min(s, s - t + a + block)) for a in range(0, t, block)]
    for a, z, e in spans:  # queries a..z-1 see keys 0..e-1 at most
        sc = torch.matmul(q[:, :, a:z].reshape(b, kvh, h // kvh * (z - a), d), k[..., :e],  # head h reads KV h // rep
                          out=scores[:b * h * (z - a) * e].view(b, kvh, h // kvh * (z - a), e)).view(b, h, z - a, e)
        if softcap:
            sc.div_(softcap).tanh_().mul_(softcap)
        m = torch.ones(z - a, e, dtype=torch.bool, device=sc.device).tril(s - t + a) if mask is None else mask
        if m.dtype == torch.bool:
            sc.masked_fill_(~m, torch.finfo(sc.dtype).min)  # as eager: a fully masked row is uniform
        else:
            sc.add_(m[..., :s].float())
        torch.softmax(sc, -1, out=probs[:, :, a:z, :e])
        probs[:, :, a:z, e:] = 0
    return probs


def _row_probs(fn: Callable[..., Any], query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
               **kwargs: Any) -> None:
    """``fn(probs, row)`` row by row, in reused buffers: ``probs`` is valid during the call only."""
    size = query.shape[1] * query.shape[2] * key.shape[2]
    buffers = (torch.empty(size, device=query.device), torch.empty(size, device=query.device))
    for row in range(query.shape[0]):
        m = mask if mask is None or mask.dim() < 4 or mask.shape[0] == 1 else mask[row:row + 1]
        fn(attention_probs(query[row:row + 1], key[row:row + 1], m, kwargs.get("scaling"), kwargs.get("softcap"),
                           out=buffers), row)


_PROBES: "weakref.WeakKeyDictionary[nn.Module, Callable[[torch.Tensor], Any]]" = weakref.WeakKeyDictionary()
PROBE_PREFIX = "quantsink_probe_"


def _probe_implementation(inner: str) -> str:
    """An attention implementation that runs ``inner`` unchanged (same kernel, same mask) and hands
    the probabilities of each probed module to its probe; registered once per ``inner``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PROBE_PREFIX + inner
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    kernel = ALL_ATTENTION_FUNCTIONS[inner]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        out = kernel(module, query, key, value, attention_mask, **kwargs)
        probe = _PROBES.get(module)
        if probe is not None:
            _row_probs(probe, query, key, attention_mask, **kwargs)
        return out

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _eager_probs(out: Any, fn: Callable[..., Any]) -> None:
    probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None  # (B, H, T, S)
    if isinstance(probs, torch.Tensor):
        for row in range(probs.shape[0]):
            fn(probs[row:row + 1].float(), row)


@contextmanager
def attention_probes(model: nn.Module, probes: Mapping[nn.Module, Callable[[torch.Tensor], Any]]) -> Iterator[None]:
    """``probes[attention module](probs)`` on every forward of the block, the forward unchanged.

    Eager attention (and quantsink's own, e.g. ReLU attention) returns its weights: they are read
    from each module's output.  Any other kernel keeps running as it is, and the probabilities are
    computed beside it from the query and key it is given (:func:`attention_probs`)."""
    from quantsink.hooks.attention import returns_weights

    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    with ExitStack() as stack:
        if returns_weights(impl):  # eager, or quantsink's own (ReLU attention): not a softmax to recompute
            for module, fn in probes.items():
                stack.callback(module.register_forward_hook(lambda m, a, out, fn=fn: _eager_probs(out, fn)).remove)
        else:
            for module in probes:
                stack.callback(_PROBES.pop, module, None)
            _PROBES.update(probes)
            stack.enter_context(attention_implementation(model, _probe_implementation(impl)))
        yield


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Switch the model's attention implementation and back in ``finally``."""
    before = model.config._attn_implementation
    if before == name:
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter:
            setter(name)
        else:
            model.config._attn_implementation = name
        yield
    finally:
        if setter:
            setter(before)
        else:
            model.config._attn_implementation = before
