"""GGUF files for the llama.cpp engine: the float reference and llama.cpp's own weight quantizations of it.

Every file derives from one *source* GGUF (an embedded model's shipped file, e.g. smollm2's Q4_1):

- ``float_reference(source)`` de-quantizes every tensor of the source to F32 with ``llama_model_quantize``
  (ftype ``ALL_F32``, ``allow_requantize``). Its weights are exactly the values transformers de-quantizes the
  same file to, so the engine's float run and quantsink's float32 reference see the same weights.
- ``weight_variant(source, "q4_k_m")`` re-quantizes that F32 file with llama.cpp's own recipe for the ftype
  (K-quant mixes, fallbacks where a row length is not a multiple of 256): what people who publish GGUFs ship.

Files are cached as ``<cache_root>/engine/<sha256(source)[:16]>/<scheme>.gguf``, written to a temporary name
in the same folder and renamed into place, so a crash or a concurrent writer never leaves a half file.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from pathlib import Path

from ..errors import QuantsinkError
from ..io import cache_root
from .llamacpp import quiet_backend, require_gguf

# scheme name -> llama.cpp ftype constant (``llama_cpp.LLAMA_FTYPE_*``); "f32" is the engine's float reference
WEIGHT_FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
}
FLOAT_REFERENCE = "f32"


def source_digest(path: Path, chunk: int = 1 << 22) -> str:
    """First 16 hex digits of the file's sha256: the cache key of everything derived from it."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def engine_dir(source: Path) -> Path:
    """``<cache_root>/engine/<digest of source>``: the folder of the files derived from ``source``."""
    return cache_root() / "engine" / source_digest(require_gguf(source))


def ftype_of(scheme: str) -> int:
    """llama.cpp's ftype number for a weight scheme name; unknown names list the valid ones."""
    if scheme not in WEIGHT_FTYPES:
        raise QuantsinkError(f"unknown llama.cpp weight scheme {scheme!r}; valid: {', '.join(WEIGHT_FTYPES)}")
    import llama_cpp

    return int(getattr(llama_cpp, WEIGHT_FTYPES[scheme]))


def quantize_file(src: Path, dst: Path, scheme: str, *, threads: int = 2) -> float:
    """Write ``src`` quantized to ``scheme`` at ``dst`` (atomically); returns the seconds it took.

    ``allow_requantize`` is on, so a quantized ``src`` is de-quantized first (that is how the F32 reference
    is made); ``output.weight``/``token_embd.weight`` follow llama.cpp's defaults for the ftype.
    """
    llama_cpp = quiet_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.allow_requantize = threads, ftype_of(scheme), True
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise QuantsinkError(f"llama_model_quantize {src.name} -> {scheme} failed (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - start


def cached_variant(source: str | Path, scheme: str, *, threads: int = 2) -> Path:
    """The cached GGUF of ``source`` in ``scheme``; made on first use (quantized from the F32 reference)."""
    ftype_of(scheme)
    dst = engine_dir(Path(source)) / f"{scheme}.gguf"
    if not dst.is_file():
        origin = Path(source) if scheme == FLOAT_REFERENCE else cached_variant(source, FLOAT_REFERENCE)
        quantize_file(origin, dst, scheme, threads=threads)
    return dst


def float_reference(source: str | Path, *, threads: int = 2) -> Path:
    """The engine's float reference: every tensor of ``source`` de-quantized to F32 (cached)."""
    return cached_variant(source, FLOAT_REFERENCE, threads=threads)


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF holds, e.g. ``{"Q5_0": 150, "Q8_0": 1, "F32": 61}``.

    Shows what an ftype really became: K-quants fall back to legacy types on rows not a multiple of 256.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(require_gguf(path)))
    return dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())
