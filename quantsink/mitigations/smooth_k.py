"""``smooth-k``: subtract each key channel's mean over the window before the KV cache is quantized (SageAttention).

For every query, ``q . (k_j - m) = q . k_j - q . m``: the shift is the same for every key ``j`` of the query's
row, so the softmax (and the attention) is unchanged in exact arithmetic; only the quantization error changes,
as an outlier channel that is large on every token (the Qwen finding: one layer-0 key channel ~145 everywhere)
no longer sets the scale of each block. Protocol: ``m`` is the mean over the window's positions (the current
forward's, padding included when windows are padded) of each key channel at the scheme's key site (post-RoPE
for ``kv-*`` and ``kv_keys=post-rope``), the cache holds ``Q(k - m)`` and the attention reads ``Q(k - m) + m``.
The mean includes later positions of the window (as SageAttention's block mean); simulated path only (llama.cpp
cannot run it: the record of an engine run refuses it).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import UsageError
from . import Env, Mitigation, register


class SmoothK(nn.Module):
    """``inner(k - m) + m`` with ``m`` the per-channel mean of ``k`` (B, T, C) over the tokens."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        m = k.mean(dim=-2, keepdim=True)
        return self.inner(k - m) + m


def key_quantizers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every key quantizer: a post-RoPE ``key_quantizer.quantizer`` or a ``k_proj``'s
    ``output_quantizer``."""
    found = []
    for fqn, module in model.named_modules():
        if fqn.endswith("key_quantizer") and hasattr(module, "quantizer"):
            found.append((module, "quantizer"))
        elif fqn.endswith("k_proj") and not isinstance(getattr(module, "output_quantizer", nn.Identity()), nn.Identity):
            found.append((module, "output_quantizer"))
    return found


@dataclass(frozen=True)
class SmoothKeys(Mitigation):
    def check(self, scheme: Any) -> None:
        if scheme.bit_widths.get("kv") is None:
            raise UsageError(f"smooth-k shifts the keys before KV-cache quantization, but scheme {scheme.name!r} "
                             f"leaves the KV cache in float; use a KV scheme (kv-q4_0, kv4, ...)")

    @contextmanager
    def attach(self, model: Any, env: Env) -> Iterator[None]:
        sites = key_quantizers(model)
        before = [getattr(owner, name) for owner, name in sites]
        for (owner, name), inner in zip(sites, before):
            setattr(owner, name, SmoothK(inner))
        env.notes["key_sites"] = len(sites)
        env.notes["how"] = "keys minus their per-channel window mean before quantization, mean added back"
        try:
            yield
        finally:
            for (owner, name), inner in zip(sites, before):
                setattr(owner, name, inner)


register(SmoothKeys(name="smooth-k"), "subtract each key channel's window mean before KV quantization "
         "(SageAttention; softmax unchanged); simulated path only")
