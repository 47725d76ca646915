"""llama.cpp as a quantsink engine (through llama-cpp-python's low-level ctypes API).

Scoring protocol (``iter_window_logits`` / ``score_windows``): each window is a list of token ids fed to the
engine *exactly as given*: no BOS is added, no text is re-tokenized. The window is decoded in one batch at
positions ``0..T-1`` with every position's logits requested (``logits_all``), into an empty KV cache (the
cache is cleared, data included, before every window). Logits row ``t`` predicts token ``t+1``; scoring
(NLL, KL, top-1) is left to the shared evaluator.

Engine settings (``EngineSettings``): the KV-cache type (``f32, f16, q8_0, q5_0, q4_0``; K and V alike),
the Hadamard rotation llama.cpp applies to a quantized KV cache (on by default in llama.cpp; off via the
environment variable ``LLAMA_ATTN_ROT_DISABLE=1``, which llama.cpp reads when a context's KV cache is built,
so this module sets it around context creation only), flash attention (on by default here: a quantized V
cache requires it, and every setting of one comparison should share it), and CPU threads.

``engine_stats`` reads the graph's own tensors through the eval callback ``cb_eval``: residual states
``l_out-<layer>``, keys ``Kcur-<layer>`` (the projection first, then the RoPE'd key that enters the cache),
values ``Vcur-<layer>`` and, with flash attention off, attention probabilities ``kq_soft_max-<layer>``.
"""

from __future__ import annotations

import ctypes
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import QuantsinkError, UsageError
if TYPE_CHECKING:
    import torch

# KV-cache type name -> ``llama_cpp.GGML_TYPE_*``
KV_CACHE_TYPES = {
    "f32": "GGML_TYPE_F32",
    "f16": "GGML_TYPE_F16",
    "q8_0": "GGML_TYPE_Q8_0",
    "q5_0": "GGML_TYPE_Q5_0",
    "q4_0": "GGML_TYPE_Q4_0",
}
FLOAT_KV = ("f32", "f16")
ROTATION_ENV = "LLAMA_ATTN_ROT_DISABLE"
_BACKEND: dict[str, object] = {}  # the imported module and the log callback (kept alive for C)


# --------------------------------------------------------------------------- backend, model, context


def require_gguf(path: str | Path) -> Path:
    """``path`` as a Path if it is an existing GGUF file (checked by its magic), else a one-line QuantsinkError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"not a GGUF file (no GGUF magic): {path}")
    return path


def _openmp_loaded() -> bool:
    """Whether a libgomp is already mapped into this process (torch's has the soname llama.cpp links to)."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def quiet_backend():
    """``llama_cpp``, imported with ``OMP_WAIT_POLICY=PASSIVE`` (unless already set), logging silenced, backend up.

    libgomp reads its wait policy once, when it loads. llama.cpp links ``libgomp.so.1``; if torch was imported
    first, llama.cpp reuses torch's copy, already initialised, and setting the variable here is too late: a
    warning says so. Set it before importing torch (spinning threads made windows 2-3x slower on shared cores).
    """
    if "module" not in _BACKEND:
        if _openmp_loaded() and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            warnings.warn("OpenMP was loaded (by torch?) before OMP_WAIT_POLICY=PASSIVE was set: llama.cpp threads "
                          "will spin, 2-3x slower on shared cores; set it before importing torch", stacklevel=2)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import llama_cpp

        _BACKEND["log"] = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_BACKEND["log"], None)
        llama_cpp.llama_backend_init()
        _BACKEND["module"] = llama_cpp
    return _BACKEND["module"]


@dataclass(frozen=True)
class EngineSettings:
    """How llama.cpp runs one pass; validated on construction."""

    kv_type: str = "f16"
    rotate: bool = True
    flash_attn: bool = True
    threads: int = 2
    ubatch: int = 0  # tokens per micro-batch (0: the whole window in one)

    def __post_init__(self) -> None:
        if self.kv_type not in KV_CACHE_TYPES:
            raise QuantsinkError(f"unknown KV-cache type {self.kv_type!r}; valid: {', '.join(KV_CACHE_TYPES)}")
        if self.kv_type not in FLOAT_KV and not self.flash_attn:
            raise QuantsinkError(f"a quantized V cache ({self.kv_type}) needs flash attention on in llama.cpp")
        if self.threads < 1:
            raise QuantsinkError(f"threads must be >= 1, got {self.threads}")

    @property
    def ggml_type(self) -> int:
        return int(getattr(quiet_backend(), KV_CACHE_TYPES[self.kv_type]))


@contextmanager
def loaded_model(gguf_path: str | Path, *, vocab_only: bool = False) -> Iterator[object]:
    """A llama.cpp model handle for ``gguf_path`` (CPU, memory-mapped), freed on exit."""
    path = require_gguf(gguf_path)
    llama_cpp = quiet_backend()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers, params.vocab_only = 0, vocab_only
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise QuantsinkError(f"llama.cpp could not load {path} (unsupported architecture or damaged file)")
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


@contextmanager
def _rotation(rotate: bool) -> Iterator[None]:
    """Set ``LLAMA_ATTN_ROT_DISABLE`` for the duration (llama.cpp reads it once per KV cache, at creation)."""
    old = os.environ.get(ROTATION_ENV)
    os.environ[ROTATION_ENV] = "0" if rotate else "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ROTATION_ENV, None)
        else:
            os.environ[ROTATION_ENV] = old


def _context_params(n_tokens: int, settings: EngineSettings, cb_eval: object | None):
    llama_cpp = quiet_backend()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_tokens  # one window = one micro-batch
    if settings.ubatch:
        params.n_ubatch = min(settings.ubatch, n_tokens)
    params.n_seq_max, params.no_perf = 1, True
    params.n_threads = params.n_threads_batch = settings.threads
    params.type_k = params.type_v = settings.ggml_type
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    if cb_eval is not None:
        params.cb_eval = cb_eval
    return params


@contextmanager
def engine_context(model: object, n_tokens: int, settings: EngineSettings, cb_eval: object | None = None):
    """A llama.cpp context with room for ``n_tokens`` and the KV cache of ``settings``, freed on exit."""
    llama_cpp = quiet_backend()
    with _rotation(settings.rotate):
        ctx = llama_cpp.llama_init_from_model(model, _context_params(n_tokens, settings, cb_eval))
    if not ctx:
        raise QuantsinkError(f"llama.cpp refused a context for {settings} ({n_tokens} tokens)")
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def n_vocab(model: object) -> int:
    llama_cpp = quiet_backend()
    return int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))


# --------------------------------------------------------------------------- decoding


def _check_ids(window: Sequence[int], vocab: int) -> None:
    if not window:
        raise QuantsinkError("an empty window cannot be scored")
    bad = [t for t in window if not 0 <= int(t) < vocab]
    if bad:
        raise QuantsinkError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")


def _fill_batch(batch, window: Sequence[int]) -> None:
    for i, token in enumerate(window):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(token), i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(window)


def decode_window(ctx: object, window: Sequence[int], vocab: int) -> np.ndarray:
    """Logits ``(T, vocab)`` float32 of ``window`` decoded at positions 0..T-1 into a freshly cleared cache."""
    llama_cpp = quiet_backend()
    _check_ids(window, vocab)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    batch = llama_cpp.llama_batch_init(len(window), 0, 1)
    try:
        _fill_batch(batch, window)
        if (rc := llama_cpp.llama_decode(ctx, batch)) != 0:
            raise QuantsinkError(f"llama_decode failed with code {rc} on a {len(window)}-token window")
    finally:
        llama_cpp.llama_batch_free(batch)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(window), vocab)).copy()


def iter_window_logits(gguf_path: str | Path, windows: Sequence[Sequence[int]], *, kv_type: str = "f16",
                       rotate: bool = True, flash_attn: bool = True, threads: int = 2,
                       ubatch: int = 0) -> Iterator[torch.Tensor]:
    """One ``(T, vocab)`` float32 logits tensor per window, in order (the protocol in the module docstring).

    One model load and one context for all windows; the KV cache is cleared before each. Settings and the
    path are checked here, before the first window is asked for.
    """
    settings = EngineSettings(kv_type, rotate, flash_attn, threads, ubatch)
    return _generate_logits(require_gguf(gguf_path), windows, settings)


def _generate_logits(path: Path, windows: Sequence[Sequence[int]], settings: EngineSettings) -> Iterator[torch.Tensor]:
    import torch  # lazily: importing torch first hands llama.cpp torch's already-initialised OpenMP runtime

    with loaded_model(path) as model:
        vocab = n_vocab(model)
        with engine_context(model, max(map(len, windows), default=1), settings) as ctx:
            for window in windows:
                yield torch.from_numpy(decode_window(ctx, window, vocab))


def score_windows(gguf_path: str | Path, windows: Sequence[Sequence[int]], **settings) -> torch.Tensor:
    """Logits ``(n_windows, T, vocab)`` float32 of equal-length windows; see ``iter_window_logits``."""
    if len({len(w) for w in windows}) > 1:
        raise QuantsinkError("score_windows needs windows of one length; use iter_window_logits")
    import torch

    return torch.stack(list(iter_window_logits(gguf_path, windows, **settings)))


def tokenize(gguf_path: str | Path, text: str) -> list[int]:
    """llama.cpp's own token ids for ``text``: no BOS/EOS added, special-token text not parsed."""
    llama_cpp = quiet_backend()
    data = text.encode("utf-8")
    with loaded_model(gguf_path, vocab_only=True) as model:
        vocab = llama_cpp.llama_model_get_vocab(model)
        buf = (llama_cpp.llama_token * (len(data) + 1))()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
    if n < 0:
        raise QuantsinkError(f"llama.cpp tokenization needs {-n} slots")
    return list(buf[:n])


# --------------------------------------------------------------------------- graph tensors through cb_eval


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h, GGML_MAX_DIMS 4, GGML_MAX_SRC 10, GGML_MAX_NAME 64)."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def tensor_array(t: GgmlTensor) -> np.ndarray:
    """A copy of an F32 host tensor as numpy, dims reversed to row-major: ggml ``ne=[C, T, 1, 1]`` -> ``(T, C)``."""
    if t.type != 0:
        raise QuantsinkError(f"graph tensor {t.name.decode()} is not F32 (ggml type {t.type})")
    ne, nb = list(t.ne), list(t.nb)
    extent = sum((n - 1) * s for n, s in zip(ne, nb)) + 4
    base = np.frombuffer((ctypes.c_char * extent).from_address(t.data), dtype=np.float32)
    dims = max([i + 1 for i, n in enumerate(ne) if n > 1], default=1)  # ggml_n_dims: trailing 1s dropped
    return np.array(np.lib.stride_tricks.as_strided(base, shape=ne[:dims][::-1], strides=nb[:dims][::-1]))


SITE_PATTERNS = {
    "residual": re.compile(r"^l_out-(\d+)$"),
    "key": re.compile(r"^Kcur-(\d+)$"),
    "value": re.compile(r"^Vcur-(\d+)$"),
    "attention": re.compile(r"^kq_soft_max-(\d+)$"),
}


class GraphCollector:
    """Copies the graph tensors whose names match ``sites`` into ``self.seen[(site, layer)]`` (a list, in
    evaluation order: a name can label several tensors, e.g. ``Kcur-3`` before and after RoPE)."""

    def __init__(self, sites: Sequence[str]) -> None:
        self.patterns = {s: SITE_PATTERNS[s] for s in sites}
        self.seen: dict[tuple[str, int], list[np.ndarray]] = {}
        self.errors: list[str] = []
        self.callback = quiet_backend().ggml_backend_sched_eval_callback(self._on_tensor)

    def _match(self, name: str) -> tuple[str, int] | None:
        for site, pattern in self.patterns.items():
            if m := pattern.match(name):
                return site, int(m.group(1))
        return None

    def _on_tensor(self, ptr: int, ask: bool, _user: int) -> bool:
        try:
            t = GgmlTensor.from_address(ptr)
            key = self._match(t.name.decode(errors="replace"))
            if key is not None and not ask:
                self.seen.setdefault(key, []).append(tensor_array(t))
            return key is not None if ask else True
        except Exception as exc:  # an exception must not cross into C: record it, keep computing
            self.errors.append(repr(exc))
            return not ask

    def layers(self, site: str, which: int = -1) -> list[np.ndarray]:
        """Per layer (in order) the ``which``-th tensor captured for ``site``."""
        keys = sorted(layer for s, layer in self.seen if s == site)
        return [self.seen[(site, layer)][which] for layer in keys]


# --------------------------------------------------------------------------- statistics (pure)


def residual_peak(h: np.ndarray) -> dict[str, float]:
    """Residual state ``h (T, C)``: token 0's L2 norm, the median norm of tokens 1..T-1, and their ratio."""
    norms = np.linalg.norm(h, axis=-1)
    median = float(np.median(norms[1:]))
    return {"token0_norm": float(norms[0]), "median_norm": median, "ratio": float(norms[0] / median)}


def massive_activation(h: np.ndarray) -> dict[str, float | int]:
    """The largest single ``|h[t, c]|`` of a residual state ``(T, C)`` with its token and channel."""
    token, channel = np.unravel_index(int(np.argmax(np.abs(h))), h.shape)
    return {"value": float(h[token, channel]), "token": int(token), "channel": int(channel)}


def key_channel_outlier(k: np.ndarray) -> dict[str, float | int]:
    """Keys ``(T, ...)`` flattened to ``(T, channels)``: the channel with the largest max-over-tokens |k|,
    that max, and the median over channels of the same max (the outlier stands out against it)."""
    per_channel = np.abs(k.reshape(k.shape[0], -1)).max(axis=0)
    channel = int(np.argmax(per_channel))
    return {"value": float(per_channel[channel]), "channel": channel, "median": float(np.median(per_channel))}


def value_drain(v: np.ndarray) -> float:
    """Values ``(T, n_kv_heads, head_dim)``: token 0's value norm over the median of the others, mean over heads."""
    norms = np.linalg.norm(v, axis=-1)  # (T, H)
    return float(np.mean(norms[0] / np.median(norms[1:], axis=0)))


def sink_attention(p: np.ndarray) -> list[float]:
    """Attention probabilities ``(heads, T_query, n_kv)``: per head, the mean over queries i >= 1 of p(i -> key 0)."""
    return [float(x) for x in p[:, 1:, 0].mean(axis=1)]


# --------------------------------------------------------------------------- engine_stats


def _summarize(col: GraphCollector, n_kv_heads: int) -> dict[str, object]:
    residual = col.layers("residual")
    # "Kcur-<layer>" labels, in order: the projection (then "+ bias" where there is one), its 3-d reshape, the
    # RoPE'd key; the next-to-last is therefore the projection with bias, as a transformers k_proj hook sees it
    key_proj, key_rope = col.layers("key", -2), col.layers("key", -1)
    return {
        "residual_peak": [residual_peak(h) for h in residual],
        "massive_activation": [massive_activation(h) for h in residual],
        "key_channel_outlier": [key_channel_outlier(k) for k in key_proj],
        "key_channel_outlier_rope": [key_channel_outlier(k) for k in key_rope],
        "value_drain": [value_drain(v.reshape(v.shape[0], n_kv_heads, -1)) for v in col.layers("value")],
        "sink_attention": [sink_attention(p) for p in col.layers("attention")] or None,
    }


def engine_stats(gguf_path: str | Path, window: Sequence[int], *, kv_type: str = "f16", rotate: bool = True,
                 attention: bool = True, threads: int = 2) -> dict[str, object]:
    """Extreme-token statistics of one window read from inside llama.cpp, per layer (index = layer).

    ``residual_peak``: token 0's residual norm (``l_out``) vs the median of the others; ``massive_activation``:
    the largest |residual value| with token and channel; ``key_channel_outlier``: on the key projection (as
    a transformers ``k_proj`` hook sees it) and after RoPE (what the cache stores); ``value_drain``;
    ``sink_attention``: per head, the mean attention of queries i >= 1 on key 0, only readable with flash
    attention off (``attention=True``, which needs a float V cache); else None, and ``attention_readable``
    says so. Keys and values are read before they enter the cache, so a quantized cache changes them only
    through earlier layers. Flash attention is off here when attention is read (the scoring runs keep it on;
    the two differ by a mean KL of ~1e-6 on smollm2).
    """
    readable = attention and kv_type in FLOAT_KV
    settings = EngineSettings(kv_type, rotate, flash_attn=not readable, threads=threads)
    col = GraphCollector(["residual", "key", "value"] + (["attention"] if readable else []))
    llama_cpp = quiet_backend()
    with loaded_model(gguf_path) as model:
        with engine_context(model, len(window), settings, col.callback) as ctx:
            decode_window(ctx, window, n_vocab(model))
        n_kv_heads = int(llama_cpp.llama_model_n_head_kv(model))
    if col.errors:
        raise QuantsinkError(f"reading llama.cpp graph tensors failed: {col.errors[0]}")
    return {**_summarize(col, n_kv_heads), "attention_readable": readable, "settings": asdict(settings)}
