"""Keys quantized as the attention sees them: after ``k_norm`` (when the model has one) and RoPE.

Engines (vLLM, TensorRT-LLM, llama.cpp) and qllm-eval cache keys after the rotary embedding; the
default ``pre-rope`` site (the ``k_proj`` output) is before it, and before gemma3's / qwen3's
``k_norm``.  Hooks on standard modules cannot see the keys between RoPE and the attention, so
``post-rope`` works in the rotated frame: the last key tensor before RoPE (the ``k_norm`` output,
else the ``k_proj`` output) is rotated with the ``(cos, sin)`` the attention module receives
(``position_embeddings``, captured by a hook on its call), quantized there, and rotated back; the model's
own RoPE then lands on the quantized post-RoPE keys (to float32 rounding, ~1e-7 relative).
This assumes the ``rotate_half`` RoPE of HF's Llama family over the whole head dim; a partial
rotary embedding (``cos`` narrower than the head) is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import QuantsinkError
from quantsink.hooks.sites import FQN, Hook


class RopeFrame:
    """The ``(cos, sin)`` (``(B, T, D)``) and token count of the current forward of one attention module."""

    def __init__(self) -> None:
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.tokens = 0

    def hook(self, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        self.cos, self.sin = pe if pe is not None else (None, None)
        self.tokens = hidden.shape[1] if hidden is not None else 0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PostRopeKeys(nn.Module):
    """Quantizes keys in the RoPE frame with ``quantizer`` (which takes ``(B, T, H*D)``)."""

    def __init__(self, quantizer: nn.Module, frame: RopeFrame, head_dim: int):
        super().__init__()
        self.quantizer, self.frame, self.head_dim = quantizer, frame, head_dim
        self.heads_first: bool | None = None  # layout of a 4-d key tensor, learnt from the token count

    def forward(self, k: torch.Tensor) -> torch.Tensor:  # (B, T, H*D), (B, H, T, D) or (B, T, H, D)
        cos, sin = self._frame()
        x = self._to_bthd(k)  # (B, T, H, D)
        c, s = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)  # (B, T, 1, D)
        rotated = x * c + rotate_half(x) * s
        q = self.quantizer(rotated.flatten(-2)).unflatten(-1, (-1, self.head_dim))  # (B, T, H, D)
        back = (q * c - rotate_half(q) * s) / (c * c + s * s)  # the inverse rotation (any RoPE scaling)
        return self._from_bthd(back, k)

    def _frame(self) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.frame.cos, self.frame.sin
        if cos is None or sin is None:
            raise QuantsinkError("kv_keys=post-rope: the attention module received no position_embeddings "
                                 "(cos, sin); use kv_keys=pre-rope for this model")
        if cos.shape[-1] != self.head_dim:
            raise QuantsinkError(f"kv_keys=post-rope: the rotary embedding covers {cos.shape[-1]} of "
                                 f"{self.head_dim} head dims (partial RoPE is not supported); use kv_keys=pre-rope")
        return cos, sin

    def _to_bthd(self, k: torch.Tensor) -> torch.Tensor:
        if k.dim() == 3:
            return k.unflatten(-1, (-1, self.head_dim))
        tokens = self.frame.tokens
        if k.shape[1] != k.shape[2]:
            self.heads_first = k.shape[2] == tokens
        if self.heads_first is None:
            raise QuantsinkError("kv_keys=post-rope: cannot tell heads from tokens in a key tensor of shape "
                                 f"{tuple(k.shape)} (as many heads as tokens); run a longer input first")
        return k.transpose(1, 2) if self.heads_first else k

    def _from_bthd(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 3:
            return x.flatten(-2)
        return (x.transpose(1, 2) if self.heads_first else x).to(like.dtype)


def post_rope(model: nn.Module, fqn: str, name: str, quantizer: nn.Module, dim: int,
              hooks: dict[str, list[Any]]) -> str:
    """values at the v_proj output; keys after any k_norm and the rotary embedding, as the attention sees them
    (and engines cache them)"""
    attn = model.get_submodule(fqn)
    frame = RopeFrame()
    keys = PostRopeKeys(quantizer, frame, dim)
    attn.add_module("key_quantizer", keys)  # found by named_modules (calibration, device moves)
    source_name = "k_norm" if isinstance(getattr(attn, "k_norm", None), nn.Module) else name
    hooks.setdefault(FQN + fqn, []).append(Hook(frame.hook, "call"))
    hooks.setdefault(f"{FQN}{fqn}.{source_name}", []).append(Hook(keys))  # its output replaced by the keys'
    return f"{fqn}.key_quantizer (on the {source_name} output, post-RoPE)"


def key_norm_note(attentions: list[nn.Module], kv_keys: str) -> str:
    """Where keys are quantized relative to a ``k_norm``, for the record."""
    if not any(isinstance(getattr(attn, "k_norm", None), nn.Module) for attn in attentions):
        return f"{kv_keys}; the model has no k_norm"
    return f"{kv_keys}; " + {"pre-rope": "before k_norm", "post-rope": "after k_norm"}[kv_keys]
