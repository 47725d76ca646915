"""Generic access to a model's KV cache arguments (sites and hooks live in :mod:`quantsink.hooks.sites`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch


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
