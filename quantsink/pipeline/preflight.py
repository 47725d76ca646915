"""What a real run would refuse, checked before anything is loaded: ``eval --dry-run`` runs it.

Names (scheme, mitigations, lm-eval tasks), the scheme/mitigation pair, the device, the model (an alias,
a directory with safetensors, a GGUF file, or a hub id that, under ``--offline``, must be cached) and the
window against the model's context (read from its ``config.json``; no weights are loaded).
"""

from __future__ import annotations

from typing import Any

from quantsink.config import RunConfig
from quantsink.errors import UsageError


def preflight(config: RunConfig) -> None:
    """Raise the UsageError a real run of ``config`` would raise on its input; return when there is none."""
    from quantsink.pipeline.execute import invalid_pair, validate_names

    validate_names([config])
    why = invalid_pair(config)
    if why:
        raise UsageError(why)
    check_context(config)


def model_config(config: RunConfig) -> Any:
    """The model's (text) config from its config.json, or None where there is none to read (a GGUF run
    on the llama.cpp engine)."""
    from transformers import AutoConfig

    from quantsink.data.models import _resolve

    path, _ = _resolve(config.model, config.offline)
    try:
        loaded = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError):
        return None
    return loaded.get_text_config() if hasattr(loaded, "get_text_config") else loaded


def check_context(config: RunConfig) -> None:
    """A window (plus its BOS) longer than the model's max_position_embeddings is refused, as the run does."""
    loaded = model_config(config)
    context = getattr(loaded, "max_position_embeddings", None)
    width = config.window + (config.bos != "never")
    if isinstance(context, int) and width > context:
        raise UsageError(f"windows of {width} positions exceed the model's context (max_position_embeddings "
                         f"{context}); use --window {context - 1} or less")
