"""On-disk cache of reference passes (safetensors + JSON metadata; never pickle).

Keyed by ``run.reference_key``: model sha256, corpus sha256, the record's
protocol (windowing, dtype, evaluator version), device, stats settings, and the
sha256 of the token windows scored; a second scheme on the same model and corpus
reuses the reference.  Each file stores the sha256 of its tensors and
metadata (``digest``) and is verified on load: a corrupt or tampered entry is
reported in one line and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from quantsink.measure.passes import PassResult, Targets
from quantsink.io import atomic_path, cache_root


TARGETS = {f.name for f in fields(Targets)}


def reference_path(key: str) -> Path:
    """``$QUANTSINK_REFERENCE_CACHE`` (default ``$QUANTSINK_CACHE/reference``) / key.safetensors."""
    root = os.environ.get("QUANTSINK_REFERENCE_CACHE")
    return (Path(root) if root else cache_root() / "reference") / f"{key}.safetensors"


def tensor_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes (sorted by name), then ``meta``."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(meta or {}, sort_keys=True).encode())
    return digest.hexdigest()


def save_pass(path: Path, result: PassResult) -> None:
    from safetensors.torch import save_file

    assert result.targets is not None
    kept = {name: value.contiguous() for name, value in vars(result.targets).items() if value is not None}
    tensors = {"nll": result.nll, "n_scored": result.n_scored, "nbytes": result.nbytes, **kept}
    if result.token_nll is not None:
        tensors["token_nll"] = result.token_nll
    meta = {"seconds": str(result.seconds), "extra": json.dumps(result.extra)}
    meta["digest"] = tensor_digest(tensors, meta)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except Exception as err:  # noqa: BLE001 - a full or read-only disk (OSError, SafetensorError): the run goes on
        why = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0][:80]
        warnings.warn(f"reference cache {path} not written ({why}); the run goes on, the next one recomputes "
                      f"the reference (set QUANTSINK_REFERENCE_CACHE to a writable folder)", stacklevel=2)


def load_pass(path: Path, n_windows: int) -> PassResult | None:
    """The cached reference pass, or None when absent or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        stored = meta.pop("digest", None)
        if stored != tensor_digest(tensors, meta):
            raise ValueError("digest mismatch" if stored else "no digest")
        targets = Targets(**{name: t for name, t in tensors.items() if name in TARGETS})
        result = PassResult(tensors["nll"], tensors["n_scored"], tensors["nbytes"], targets=targets,
                            seconds=float(meta.get("seconds", 0)), extra=json.loads(meta.get("extra", "{}")),
                            token_nll=tensors.get("token_nll"))
        consistent = (len(result.nll) == n_windows
                      and all(len(t) == int(result.n_scored.sum()) for t in vars(result.targets).values()
                              if t is not None)
                      and bool(torch.isfinite(result.nll).all()))
        if not consistent:
            raise ValueError("shapes do not match the windows")
        return result
    except Exception as err:  # noqa: BLE001 - any unreadable cache entry is recomputed
        warnings.warn(f"reference cache {path.name} is corrupt ({err}); recomputing it", stacklevel=2)
        return None
