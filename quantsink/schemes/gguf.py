"""llama.cpp's own scheme names, the same on both engines.

KV cache ``kv-q8_0``, ``kv-q5_0``, ``kv-q4_0`` (``rot=on|off``, default on as llama.cpp). With ``--engine
llama.cpp`` they run for real (the KV-cache type of the context; ``simulated: false`` in the record). With
``--engine transformers`` they are simulated twins of ggml's arithmetic (ggml-quants.c, ``quantize_row_*_ref``):

* blocks of 32 consecutive channels of one token's key (post-RoPE, after any k_norm: what llama.cpp caches) or
  value; q8_0: ``d = amax / 127``, ``q = round(x / d)``; q5_0 / q4_0: ``d = m / -16`` (``/ -8``) with ``m`` the
  signed value of largest magnitude, ``q = min(31, trunc(x / d + 16.5))`` (``15``, ``8.5``); the stored scale is
  ``d`` rounded to float16, and the value read back is ``(q - zero) * fp16(d)``.
* ``rot=on`` (llama-kv-cache.cpp, ``attn_rot_k``/``attn_rot_v``; off with ``LLAMA_ATTN_ROT_DISABLE=1``): when the
  cache is quantized and the head dim is a multiple of 64, keys are multiplied by an orthonormal Sylvester
  Walsh-Hadamard matrix over blocks of ``nrot`` channels (the largest power of two >= 64 dividing the head dim)
  and values over blocks of 64, before quantization; queries get the same rotation (so ``q . k`` is unchanged)
  and the attention output the inverse one. The twin quantizes ``x H`` and reads back ``Q(x H) H`` (``H = H^T =
  H^-1``), the same attention up to float rounding.
* Channel order: llama.cpp caches a head's key channels in GGUF order; for interleaved-RoPE architectures (Llama:
  convert_hf_to_gguf permutes q/k rows) that is transformers' ``0, D/2, 1, D/2+1, ...``, so blocks of 32 (and the
  rotation) cover other channels than in transformers' order; the twin quantizes in GGUF order (``gguf_order``).
  Measured on smollm2, kv-q4_0 rot=off keys only: KL 0.111 in transformers' order, engine 0.174.
* Queries: llama.cpp's CPU flash-attention kernel converts each query to the K cache's dot type (``vec_dot_type``,
  q8_0 for all three caches) before ``q . k``; the twin quantizes the post-RoPE queries (rotated when keys are) to
  q8_0 blocks the same way (``queries=q8_0``; ``queries=float`` leaves them, to measure what that costs).

Weight schemes ``q8_0 q6_k q5_k_m q4_k_m q4_0 iq4_xs``: llama.cpp's quantizer (``llama_model_quantize``) on the
engine's F32 file; engine only (a transformers twin is not built yet: refused in one line).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..errors import UsageError
from . import Scheme, register
from quantsink.hooks.sites import FQN, Hook
from .kv_sites import PostRopeKeys, RopeFrame, post_rope
from .quant import keep_rows
from .simulated import KeepFp, Simulated, at_projection, attention_modules, head_dim

QK = 32  # ggml's block size for q8_0, q5_0, q4_0
# format -> (bits, divisor of the scale, zero offset); q8_0 is symmetric around 0 with round-half-away
GGML_KV = {"q8_0": (8, 127.0, 0.0), "q5_0": (5, -16.0, 16.0), "q4_0": (4, -8.0, 8.0)}
WEIGHT_FORMATS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs")
WEIGHT_BITS = {"q8_0": 8.5, "q6_k": 6.5625, "q5_k_m": 5.5, "q4_k_m": 4.5, "q4_0": 4.5, "iq4_xs": 4.25}


def ggml_block_quant(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` (..., n), n a multiple of 32, quantized and read back as ggml's ``fmt`` blocks (float32)."""
    _, divisor, zero = GGML_KV[fmt]
    blocks = x.float().unflatten(-1, (-1, QK))  # (..., n/32, 32)
    if fmt == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / divisor
    else:
        idx = blocks.abs().argmax(-1, keepdim=True)
        d = blocks.gather(-1, idx) / divisor  # the signed extreme maps to -zero
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    if fmt == "q8_0":
        q = torch.round(blocks * inv)
        q = torch.where((blocks * inv - q).abs() == 0.5, torch.trunc(blocks * inv + torch.sign(blocks) * 0.5), q)
    else:
        q = torch.clamp(torch.trunc(blocks * inv + (zero + 0.5)), max=2 * zero - 1) - zero  # (int8) trunc
    d16 = d.to(torch.float16).float()
    return (q * d16).flatten(-2).to(x.dtype)


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Walsh-Hadamard matrix of order ``n`` (a power of 2), as ggml_gen_hadamard."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).float()


def rotation_size(dim: int, role: str) -> int | None:
    """llama.cpp's rotation block for a head of ``dim`` channels (keys: the largest power of two >= 64 dividing
    it; values: 64), or None where it does not rotate (``dim`` not a multiple of 64)."""
    if dim % 64:
        return None
    if role == "value":
        return 64
    n = 64
    while dim % (2 * n) == 0:
        n *= 2
    return n


def rotate_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` (..., C) times the Hadamard matrix of order ``n`` over each block of ``n`` channels (its own inverse)."""
    return (x.float().unflatten(-1, (-1, n)) @ hadamard(n).to(x.device)).flatten(-2).to(x.dtype)


# architectures whose GGUF stores q/k with llama.cpp's interleaved RoPE ("norm": channel pairs (2i, 2i+1));
# convert_hf_to_gguf permutes their q_proj/k_proj rows, so a head's channels in the cache are in GGUF order
INTERLEAVED_ROPE = ("llama", "mistral", "mixtral", "granite")


def gguf_order(dim: int) -> torch.Tensor:
    """GGUF channel j of a head of ``dim`` (interleaved RoPE) = transformers channel ``order[j]``:
    ``0, D/2, 1, D/2+1, ...`` (convert_hf_to_gguf's permute, inverted)."""
    half = torch.arange(dim // 2)
    return torch.stack([half, half + dim // 2], 1).flatten()


class GgmlKVQuantizer(nn.Module):
    """A KV site's quantizer ``(B, T, H*D)``: the head's channels in llama.cpp's order (``order``, keys and
    queries of interleaved-RoPE models), its cache rotation (``rot``) and ggml blocks of 32."""

    def __init__(self, fmt: str, rot: int | None, keep: KeepFp, order: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.rot, self.keep, self.order = fmt, rot, keep, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._permute(x, self.order)
        y = rotate_blocks(y, self.rot) if self.rot else y
        out = ggml_block_quant(y, self.fmt)
        out = rotate_blocks(out, self.rot) if self.rot else out
        out = self._permute(out, None if self.order is None else torch.argsort(self.order))
        keep = self.keep.rows(x)
        return out if keep is None else keep_rows(out, x, keep)

    @staticmethod
    def _permute(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        if order is None:
            return x
        return x.unflatten(-1, (-1, len(order)))[..., order.to(x.device)].flatten(-2)

    def extra_repr(self) -> str:
        return f"ggml {self.fmt} blocks of {QK}, hadamard {self.rot or 'off'}, gguf order {self.order is not None}"


def post_rope_queries(model: nn.Module, fqn: str, quantizer: nn.Module, dim: int, hooks: dict[str, list[Any]]) -> str:
    """The queries as the attention sees them (after any q_norm and RoPE) through ``quantizer``, as ``post_rope``
    does for keys."""
    attn = model.get_submodule(fqn)
    frame = RopeFrame()
    queries = PostRopeKeys(quantizer, frame, dim)
    attn.add_module("query_quantizer", queries)
    source = "q_norm" if isinstance(getattr(attn, "q_norm", None), nn.Module) else "q_proj"
    hooks.setdefault(FQN + fqn, []).append(Hook(frame.hook, "call"))
    hooks.setdefault(f"{FQN}{fqn}.{source}", []).append(Hook(queries))
    return f"{fqn}.query_quantizer (q8_0 queries, on the {source} output, post-RoPE)"


@dataclass(frozen=True)
class GgufKV(Simulated):
    """llama.cpp's quantized KV cache (``fmt``, ``rot``); on transformers its simulated twin (module docstring)."""

    fmt: Literal["q8_0", "q5_0", "q4_0"] = "q8_0"
    rot: bool = True
    queries: Literal["q8_0", "float"] = "q8_0"
    engine_kv: ClassVar[bool] = True

    @property
    def bits(self) -> float:
        return 16.0

    def parts(self) -> dict[str, str | None]:
        rot = "Hadamard rotation as llama.cpp (keys: blocks of the largest power of 2 >= 64 dividing the head " \
              "dim; values: 64)" if self.rot else "no rotation (LLAMA_ATTN_ROT_DISABLE=1)"
        return {"weights": None, "activations": None,
                "kv": f"ggml {self.fmt} (blocks of 32, float16 scale), keys post-RoPE; {rot}"}

    def _attach_kv(self, model: nn.Module, keep: KeepFp, hooks: dict[str, list[Any]]) -> list[str]:
        sites = []
        interleaved = getattr(model.config, "model_type", "") in INTERLEAVED_ROPE
        for fqn, attn in attention_modules(model):
            dim = head_dim(model, attn)
            order = gguf_order(dim) if interleaved else None
            for name, role, place in (("k_proj", "key", post_rope), ("v_proj", "value", at_projection)):
                rot = rotation_size(dim, role) if self.rot else None
                quantizer = GgmlKVQuantizer(self.fmt, rot, keep, order if role == "key" else None)
                sites.append(place(model, fqn, name, quantizer.to(getattr(attn, name).weight.device), dim, hooks))
            if self.queries == "q8_0":
                rot = rotation_size(dim, "key") if self.rot else None
                queries = GgmlKVQuantizer("q8_0", rot, KeepFp(lambda *a: None), order)
                sites.append(post_rope_queries(model, fqn, queries, dim, hooks))
        return sites

    def check_model(self, model: Any) -> None:
        for _, attn in attention_modules(model):
            if head_dim(model, attn) % QK:
                raise UsageError(f"{self.spec()}: the head dim {head_dim(model, attn)} is not a multiple of 32")


@dataclass(frozen=True)
class GgufWeights(Scheme):
    """llama.cpp's weight quantization ``fmt`` (``llama_model_quantize`` recipe, K-quant mixes and fallbacks)."""

    fmt: Literal["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs"] = "q8_0"

    @property
    def bits(self) -> float:
        return WEIGHT_BITS[self.fmt]

    @property
    def bit_widths(self) -> dict[str, int | None]:
        return {"weights": int(self.bits), "activations": 8, "kv": None}

    def check_model(self, model: Any) -> None:
        raise UsageError(f"{self.name} runs on llama.cpp only (its transformers twin is not built yet): "
                         f"add --engine llama.cpp")

    def apply(self, model: Any, ctx: Any) -> Any:
        self.check_model(model)


for _fmt in GGML_KV:
    register(GgufKV(name=f"kv-{_fmt}", fmt=_fmt, kv_bits=GGML_KV[_fmt][0], kv_keys="post-rope", kv_sym=True),
             f"llama.cpp {_fmt} KV cache, Hadamard rotation (rot=on|off); simulated twin on transformers")
for _fmt in WEIGHT_FORMATS:
    register(GgufWeights(name=_fmt, fmt=_fmt), f"llama.cpp {_fmt.upper()} weights (llama_model_quantize); "
             f"engine llama.cpp only")
