"""Generic access to a decoder-only model's parts (no per-architecture branches)."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def decoder_layers(model: Any) -> list[tuple[str, Any]]:
    """``[(fqn, layer), ...]``: the children of the ModuleList whose entries are decoder layers.

    Found by class name (``...DecoderLayer``), falling back to the longest ModuleList.
    """
    lists = [(fqn, mod) for fqn, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod)]
    named = [(fqn, mod) for fqn, mod in lists if type(mod[0]).__name__.endswith("DecoderLayer")]
    fqn, layers = (named or sorted(lists, key=lambda item: -len(item[1])) or [("", None)])[0]
    if layers is None:
        raise ValueError("no decoder layers found (no ModuleList in the model)")
    return [(f"{fqn}.{i}", layer) for i, layer in enumerate(layers)]


def hidden_of(output: Any) -> torch.Tensor:
    """The residual state a decoder layer returns (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its residual state replaced by ``hidden``."""
    if isinstance(output, (tuple, list)):
        return type(output)((hidden, *output[1:]))
    return hidden


def cache_kwarg(model: Any) -> str:
    """The name under which ``model.forward`` takes a KV cache (``cache`` in transformers >= 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else None
        if value is not None:
            return value
    return None
