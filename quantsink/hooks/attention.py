"""Attention functions quantsink adds to transformers' registries (``AttentionInterface``).

``quantsink_relu`` is the ReLU attention of Guo et al. (2024), the pretraining-time remedy
that removes the attention sink: ``weights[i, j] = relu(q_i . k_j / sqrt(d) + mask[i, j]) / i``
(``i`` the 1-based query position, as in the paper's Bigram-Backcopy code).  Weights do not
sum to 1, so a head can write (almost) nothing without parking its attention on ``<s>``.

A model trained with it records ``"quantsink_attention": "relu"`` in its ``config.json``;
:func:`implementation_for` reads that, and :func:`quantsink.models.load_model` passes the
registered name as ``attn_implementation``: ``--model DIR`` loads it with no remote code.
Every function here returns its attention weights, and the stats probes read them from the
module's output instead of recomputing a softmax beside the kernel (see :func:`returns_weights`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RELU = "quantsink_relu"

#: ``quantsink_attention`` value in a config.json -> registered ``attn_implementation``
DECLARED: dict[str, str] = {"relu": RELU}
_registered = False


def relu_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[Any, Any]:
    """ReLU attention in transformers' attention-function signature -> (output, weights)."""
    import torch

    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, T, S)
    scores = scores + _additive_mask(attention_mask, scores)  # (B, H, T, S)
    n_q, n_k = query.shape[-2], key.shape[-2]
    position = torch.arange(n_k - n_q + 1, n_k + 1, device=scores.device, dtype=scores.dtype)  # (T,) 1-based
    weights = torch.relu(scores) / position[:, None]  # (B, H, T, S)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.to(value.dtype), value)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), weights  # (B, T, H, D), (B, H, T, S)


def _additive_mask(mask: Any, scores: Any) -> Any:
    """An additive float mask (large negative where masked); causal when none is given."""
    import torch

    low = torch.finfo(scores.dtype).min
    if mask is None:
        n_q, n_k = scores.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)  # (T, S)
        return torch.zeros_like(causal, dtype=scores.dtype).masked_fill(~causal, low)
    mask = mask[..., : scores.shape[-1]]
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, low)
    return mask.to(scores.dtype)


def register() -> None:
    """Register quantsink's attention functions (and their mask builders) with transformers; idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RELU, relu_attention)
    AttentionMaskInterface.register(RELU, eager_mask)
    _registered = True


def returns_weights(implementation: str | None) -> bool:
    """True for implementations that return their attention weights (probes read them, never a softmax)."""
    return implementation == "eager" or implementation in DECLARED.values()


def declared(config: dict[str, Any]) -> str | None:
    """The registered implementation a config.json asks for, or None (any standard one will do)."""
    name = config.get("quantsink_attention")
    if name is None or name == "softmax":
        return None
    if name not in DECLARED:
        from quantsink.errors import QuantsinkError

        raise QuantsinkError(f"config.json names quantsink_attention={name!r}; this quantsink knows "
                             f"{', '.join(['softmax', *DECLARED])}: upgrade quantsink or fix the config")
    return DECLARED[name]


def implementation_for(where: str, default: str) -> str:
    """``attn_implementation`` for a model at ``where``: the one its config.json declares, else ``default``."""
    path = Path(where) / "config.json"
    if not path.is_file():
        return default
    found = declared(json.loads(path.read_text(encoding="utf-8")))
    if found is None:
        return default
    register()
    return found
