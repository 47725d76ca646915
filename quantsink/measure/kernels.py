"""The float32 matrix kernel of every quantsink forward on a CPU: oneDNN's inner product.

``torch.nn.functional.linear`` on a CPU float32 tensor calls MKL's ``sgemm``; oneDNN's inner
product (``torch.ops.mkldnn._linear_pointwise``, the kernel torch's own inductor picks for a
frozen CPU Linear) computes the same ``x W^T + b`` 1.13-1.17x faster on this machine's body
shapes (``scripts/bench_eval.py`` measures the whole pass).  Inside :func:`fast_linear` every
such call takes it; any other call (another dtype or device, a weight or input that needs
gradients, a non-contiguous weight) is left to torch.

Numbers: a row's result is the same bits whatever the other rows of the call (2 rows or
more), the thread count, or the run; they differ from MKL's in the last bits (~1e-7
relative), so the evaluator version moved with the switch (5).  A record names the kernel
(``env.facts()['linear_kernel']``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

_F_LINEAR = torch.nn.functional.linear
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # exact types: a subclass (a quantized weight) keeps its own linear
_active = threading.local()


def kernel_name() -> str:
    """The float32 CPU linear kernel a forward inside :func:`fast_linear` uses."""
    return "onednn" if torch.backends.mkldnn.is_available() else "aten"


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN computes this ``linear``: plain CPU float32 tensors (not a tensor subclass such as torchao's
    or quanto's quantized weights, which implement their own ``linear``), nothing for autograd to record (grad
    mode off, or no tensor that needs it), a contiguous 2-D weight, 2+ rows."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    plain = all(type(t) in _PLAIN and t.layout == torch.strided for t in tensors)
    return (plain and not recorded and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and weight.dim() == 2 and weight.is_contiguous() and x.dim() >= 2 and x.numel() >= 2 * x.shape[-1])


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` by oneDNN's inner product (any leading dims of ``x``)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _OneDnnLinear(TorchFunctionMode):
    """Routes ``F.linear`` calls that :func:`_takes` accepts to :func:`onednn_linear`."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _F_LINEAR:
            x, weight, bias = _linear_args(args, kwargs)
            if _takes(x, weight, bias):
                return onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


def _linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    named = dict(zip(("input", "weight", "bias"), args)) | kwargs
    return named["input"], named["weight"], named.get("bias")


@contextmanager
def fast_linear() -> Iterator[None]:
    """Every float32 CPU ``F.linear`` inside the block runs on oneDNN (re-entrant; a no-op without oneDNN)."""
    if getattr(_active, "on", False) or kernel_name() != "onednn":
        yield
        return
    _active.on = True
    try:
        with _OneDnnLinear():
            yield
    finally:
        _active.on = False
