"""Attention functions quantsink adds to transformers' registries (``AttentionInterface``).

Each variant is one :class:`Kernel` in :data:`KERNELS`: how scores become weights, an optional
transform of each head's output, and optional learned parameters it adds to every attention module.
Scores are ``s[i, j] = q_i . k_j * scaling`` with the causal (or given) mask; ``i`` is the query.

* ``relu`` -- Guo et al. (2024), the paper's sink-free attention: ``w[i, j] = relu(s[i, j]) / i``,
  ``i`` the 1-based query position, exactly as the authors' Bigram-Backcopy code (``BBM/model.py``:
  ``relu(scores) / arange(1, T + 1)`` over query rows).  Weights do not sum to 1, and the weight of
  query 1 (``<s>`` itself) on ``<s>`` is ``relu(s[1, 1])``: unbounded.
* ``softmax1`` -- "off by one" softmax (E. Miller, 2023): ``w[i, j] = exp(s[i, j]) / (1 + sum_j exp(s[i, j]))``,
  one fixed zero logit in the denominator, so a head can attend to (almost) nothing.
* ``sink-logit`` -- gpt-oss's attention sinks: a learned logit ``b_h`` per head in the denominator,
  ``w[i, j] = exp(s[i, j]) / (exp(b_h) + sum_j exp(s[i, j]))``; ``b_h`` is the parameter ``sinks``
  (shape ``(H,)``, initialised to 0: softmax1 at step 0) of each attention module.
* ``gated`` -- Qiu et al. (2025, arXiv 2505.06708), gating at the SDPA output (their G1), **elementwise**:
  ``o_i <- o_i * sigmoid(x_i W_g)`` per head and channel, ``x_i`` the block's attention input (the
  hidden state after the pre-attention LayerNorm), ``W_g`` the bias-free ``gate_proj`` (C -> H*D) of each
  attention module; the weights are a plain softmax.
* ``softpick`` -- Zuhri et al. (2025, arXiv 2504.20966), rectified softmax:
  ``w[i, j] = relu(exp(s[i, j]) - 1) / (sum_j |exp(s[i, j]) - 1| + eps)``, eps = 1e-6, masked keys
  excluded from both sums; computed shifted by ``m = max_j s[i, j]`` (numerator and denominator times
  ``exp(-m)``, eps too), the same value without overflow.

A model trained with one records ``"quantsink_attention": "<name>"`` in its ``config.json``;
:func:`implementation_for` reads that, :func:`quantsink.data.models.load_model` passes the registered
name as ``attn_implementation`` and then :func:`restore` adds the learned parameters and loads them
from the model's ``model.safetensors``: ``--model DIR`` loads it with no remote code.
Every function here returns its attention weights (before any output gate), and the stats probes
read them from the module's output instead of recomputing a softmax (see :func:`returns_weights`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..registry import Registry

SOFTPICK_EPS = 1e-6


@dataclass(frozen=True)
class Kernel:
    """One attention variant: scores -> weights, each head's output -> output, learned parameters."""

    implementation: str  # the name registered in transformers' AttentionInterface
    weights: Callable[[Any, Any, Any], Any]  # (module, scores (B,H,T,S) float32, keep (B|1,1|H,T,S) bool) -> weights
    output: Callable[[Any, Any], Any] | None = None  # (module, out (B,H,T,D)) -> out
    extras: Callable[[Any], None] | None = None  # adds learned parameters to one attention module


# --------------------------------------------------------------------------- weights


def relu_weights(module: Any, scores: Any, keep: Any) -> Any:
    """relu(s) / i, i the 1-based query position (the last T of S keys' positions)."""
    import torch

    n_q, n_k = scores.shape[-2:]
    position = torch.arange(n_k - n_q + 1, n_k + 1, device=scores.device, dtype=scores.dtype)  # (T,)
    return torch.relu(scores).masked_fill(~keep, 0.0) / position[:, None]


def softmax_weights(module: Any, scores: Any, keep: Any) -> Any:
    import torch

    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)


def with_sink_logit(scores: Any, keep: Any, logit: Any) -> Any:
    """exp(s_j) / (exp(logit_h) + sum_j exp(s_j)): softmax over the keys and one extra per-head logit, dropped."""
    import torch

    sink = logit.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # (B, H, T, 1)
    combined = torch.cat([scores.masked_fill(~keep, float("-inf")), sink], dim=-1)  # (B, H, T, S+1)
    return torch.softmax(combined, dim=-1)[..., :-1]


def softmax1_weights(module: Any, scores: Any, keep: Any) -> Any:
    import torch

    return with_sink_logit(scores, keep, torch.zeros(scores.shape[1], device=scores.device))


def sink_logit_weights(module: Any, scores: Any, keep: Any) -> Any:
    return with_sink_logit(scores, keep, module.sinks)


def softpick_weights(module: Any, scores: Any, keep: Any) -> Any:
    """relu(e^s - 1) / (sum |e^s - 1| + eps), shifted by the row max m (all three terms times e^-m)."""
    import torch

    top = scores.masked_fill(~keep, float("-inf")).amax(-1, keepdim=True).clamp(min=-80.0)  # (B, H, T, 1)
    shifted = (torch.exp(scores - top) - torch.exp(-top)).masked_fill(~keep, 0.0)  # (e^s - 1) e^-m
    return torch.relu(shifted) / (shifted.abs().sum(-1, keepdim=True) + SOFTPICK_EPS * torch.exp(-top))


# --------------------------------------------------------------------------- learned parameters


def add_sinks(module: Any) -> None:
    """gpt-oss's per-head sink logit: ``module.sinks`` (H,), initialised to 0."""
    import torch

    weight = module.q_proj.weight
    module.sinks = torch.nn.Parameter(torch.zeros(module.num_heads, device=weight.device, dtype=weight.dtype))


def add_gate(module: Any) -> None:
    """The elementwise output gate's ``module.gate_proj`` (C -> H*D, no bias) and a forward pre-hook
    that keeps the module's input hidden state for :func:`gate_output` (popped there)."""
    import torch

    q = module.q_proj
    module.gate_proj = torch.nn.Linear(q.in_features, module.num_heads * module.head_dim, bias=False,
                                       device=q.weight.device, dtype=q.weight.dtype)
    module.register_forward_pre_hook(_keep_gate_input, with_kwargs=True)


def _keep_gate_input(module: Any, args: tuple, kwargs: dict) -> None:
    module.__dict__["_gate_input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def gate_output(module: Any, out: Any) -> Any:
    """out (B, H, T, D) * sigmoid(x W_g) reshaped per head, x the module's input (B, T, C)."""
    import torch

    x = module.__dict__.pop("_gate_input")  # (B, T, C)
    b, h, t, d = out.shape
    gate = torch.sigmoid(module.gate_proj(x)).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
    return out * gate.to(out.dtype)


# --------------------------------------------------------------------------- the registry

#: ``quantsink_attention`` in a config.json (and ``--attention``) -> the kernel
KERNELS: Registry[Kernel] = Registry("attention")
KERNELS.register("relu", Kernel("quantsink_relu", relu_weights),
                 help="relu(q.k/sqrt(d)) / i, the paper's sink-free attention (Guo et al. 2024)")
KERNELS.register("softmax1", Kernel("quantsink_softmax1", softmax1_weights),
                 help="exp(s_i) / (1 + sum exp(s_j)): softmax with one zero logit, a head may attend to nothing")
KERNELS.register("sink-logit", Kernel("quantsink_sink_logit", sink_logit_weights, extras=add_sinks),
                 aliases=("sinks",), help="a learned logit per head in the softmax denominator (gpt-oss)")
KERNELS.register("gated", Kernel("quantsink_gated", softmax_weights, output=gate_output, extras=add_gate),
                 help="softmax, then each head's output times sigmoid(x W_g), elementwise (arXiv 2505.06708, G1)")
KERNELS.register("softpick", Kernel("quantsink_softpick", softpick_weights),
                 help="relu(e^s - 1) / (sum |e^s - 1| + eps): rectified softmax (arXiv 2504.20966)")

RELU = KERNELS.get("relu").implementation

#: ``quantsink_attention`` value in a config.json -> registered ``attn_implementation``
DECLARED: dict[str, str] = {name: KERNELS.get(name).implementation for name in KERNELS.names()}
_registered = False


def attend(kernel: Kernel, module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
           dropout: float = 0.0, **kwargs: Any) -> tuple[Any, Any]:
    """One kernel in transformers' attention-function signature -> (output (B,T,H,D), weights (B,H,T,S))."""
    import torch

    wide = torch.promote_types(query.dtype, torch.float32)  # scores and weights in float32 at least
    scores = torch.matmul(query.to(wide), key.to(wide).transpose(-1, -2)) * scaling  # (B, H, T, S)
    additive = _additive_mask(attention_mask, scores)  # (B|1, 1|H, T, S)
    keep = additive > torch.finfo(scores.dtype).min / 2
    weights = kernel.weights(module, scores + additive.masked_fill(~keep, 0.0), keep)  # (B, H, T, S)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.to(value.dtype), value)  # (B, H, T, D)
    if kernel.output is not None:
        out = kernel.output(module, out)
    return out.transpose(1, 2).contiguous(), weights.to(value.dtype)


def relu_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[Any, Any]:
    """ReLU attention in transformers' attention-function signature -> (output, weights)."""
    return attend(KERNELS.get("relu"), module, query, key, value, attention_mask, scaling, dropout)


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
    return mask.to(scores.dtype).clamp(min=low)


def register() -> None:
    """Register quantsink's attention functions (and their mask builders) with transformers; idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    for name in KERNELS.names():
        kernel = KERNELS.get(name)
        AttentionInterface.register(kernel.implementation, functools.partial(attend, kernel))
        AttentionMaskInterface.register(kernel.implementation, eager_mask)
    _registered = True


def attention_modules(model: Any) -> list[Any]:
    """The self-attention modules of a decoder (those with q/k/v projections and a head count)."""
    return [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "num_heads") and hasattr(m, "head_dim")]


def add_parameters(model: Any, name: str) -> Any:
    """Give every attention module of ``model`` the learned parameters kernel ``name`` reads; returns ``model``."""
    extras = KERNELS.get(name).extras
    for module in attention_modules(model) if extras else []:
        extras(module)
    return model


def restore(model: Any, where: str) -> Any:
    """The declared kernel's learned parameters on ``model``, loaded from ``where``'s ``model.safetensors``
    (``from_pretrained`` drops them: OPT's attention has no such parameters); a no-op for other models."""
    path = Path(where) / "config.json"
    name = json.loads(path.read_text(encoding="utf-8")).get("quantsink_attention") if path.is_file() else None
    if declared({"quantsink_attention": name}) is None or KERNELS.get(name).extras is None:
        return model
    return _load_extras(add_parameters(model, name), Path(where) / "model.safetensors")


def _load_extras(model: Any, weights: Path) -> Any:
    from safetensors import safe_open

    from quantsink.errors import QuantsinkError

    wanted = {k for k in model.state_dict() if k.endswith((".sinks", ".gate_proj.weight"))}
    with safe_open(str(weights), framework="pt") as handle:
        missing = sorted(wanted - set(handle.keys()))
        if missing:
            raise QuantsinkError(f"{weights} lacks the attention parameters {', '.join(missing[:3])}: "
                                 f"not a model trained with its declared quantsink_attention")
        loaded = {k: handle.get_tensor(k) for k in wanted}
    model.load_state_dict(loaded, strict=False)
    return model


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
