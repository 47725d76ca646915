"""bitsandbytes weight quantization: LLM.int8 and 4-bit NF4 / FP4 (real kernels).

Each selected ``nn.Linear`` becomes a real ``bitsandbytes.nn.Linear8bitLt`` or
``Linear4bit`` on the model's own device; bitsandbytes quantizes the weight
when the module is moved there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..errors import UsageError
from . import QuantContext, Scheme, default_filter, register, replace_linears


@dataclass(frozen=True)
class BnbInt8(Scheme):
    """LLM.int8 (Dettmers et al. 2022): int8 vector-wise weights; input columns whose
    magnitude exceeds ``threshold`` run in float (mixed-precision decomposition).
    ``threshold`` 6.0 is transformers' default; ``Linear8bitLt``'s own default is 0.0
    (no outlier decomposition)."""

    threshold: float = 6.0
    backend: ClassVar[str] = "bitsandbytes"

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError("threshold must be >= 0")

    @property
    def bits(self) -> float:
        return 8.0

    @property
    def bit_widths(self) -> dict[str, int | None]:
        return {"weights": 8, "activations": 8, "kv": None}  # LLM.int8: int8 activations, outliers in float

    def apply(self, model: Any, ctx: QuantContext) -> Any:
        import bitsandbytes as bnb

        def make(lin: Any) -> Any:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=self.threshold)
            new.weight = bnb.nn.Int8Params(lin.weight.data.float().cpu(), requires_grad=False,
                                           has_fp16_weights=False)
            if lin.bias is not None:
                new.bias = lin.bias
            return new.to(lin.weight.device)

        # In eval mode Linear8bitLt runs MatMul8bitLt: it casts inputs to float16, quantizes them
        # per row (vector-wise int8) and keeps columns over `threshold` in float16.  It logs
        # that cast on every call; say it once, in the record.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        ctx.notes["quantized_modules"] = len(replace_linears(model, ctx, make))
        ctx.notes["kernel"] = ("bitsandbytes MatMul8bitLt: int8 vector-wise weights and activations "
                               "(activations cast to float16 first), outlier columns > threshold in float16")
        return model


@dataclass(frozen=True)
class Bnb4bit(Scheme):
    """bitsandbytes 4-bit weights (NF4 or FP4), block-wise absmax scales of ``blocksize``;
    matmuls run in ``compute_dtype``."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    blocksize: int = 64
    double_quant: bool = False
    backend: ClassVar[str] = "bitsandbytes"

    def __post_init__(self) -> None:
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError("blocksize must be a power of two in 32..4096")

    @property
    def bits(self) -> float:
        return 4.0

    @property
    def bit_widths(self) -> dict[str, int | None]:
        return {"weights": 4, "activations": None, "kv": None}

    def check_model(self, model: Any) -> None:
        for fqn, module in model.named_modules():
            if fqn and default_filter(module, fqn):
                check_cpu_blocks(module, self.name, self.blocksize)

    def apply(self, model: Any, ctx: QuantContext) -> Any:
        import bitsandbytes as bnb

        from quantsink.data.models import torch_dtype

        def make(lin: Any) -> Any:
            check_cpu_blocks(lin, self.name, self.blocksize)
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=torch_dtype(self.compute_dtype), quant_type=self.quant_type,
                                    compress_statistics=self.double_quant, quant_storage=None)
            new.weight = bnb.nn.Params4bit(lin.weight.data.float().cpu(), requires_grad=False,
                                           quant_type=self.quant_type, blocksize=self.blocksize,
                                           compress_statistics=self.double_quant)
            if lin.bias is not None:
                new.bias = lin.bias
            if lin.weight.device.type == "cpu" and not packed_cpu_fits(lin, self.blocksize):
                new.support_avx512bf16_for_cpu = False  # bitsandbytes' generic CPU path instead
                ctx.notes["cpu_generic_modules"] = ctx.notes.get("cpu_generic_modules", 0) + 1
            return new.to(lin.weight.device)

        ctx.notes["quantized_modules"] = len(replace_linears(model, ctx, make))
        ctx.notes["kernel"] = f"bitsandbytes Linear4bit: {self.quant_type} weights, {self.compute_dtype} matmul"
        return model


def packed_cpu_fits(lin: Any, blocksize: int) -> bool:
    """Whether bitsandbytes' packed CPU kernel (AVX512-bf16 machines, eval mode) takes this layer: it needs
    ``out_features`` a multiple of 32 (and ``in_features`` a multiple of the blocksize, ``check_cpu_blocks``) and
    fails on other layers.  Those take bitsandbytes' generic CPU path (the same 4-bit weights, de-quantized for
    the product); layers that fit keep the packed kernel and its numbers."""
    return lin.out_features % 32 == 0 and lin.in_features % blocksize == 0


def check_cpu_blocks(lin: Any, scheme: str, blocksize: int) -> None:
    """On the CPU, refuse a blocksize that does not divide a layer's inputs: bitsandbytes' packed kernel fails on
    such a layer and its generic CPU de-quantization reads blocks that straddle rows wrongly (smollm2's 576-input
    layers at blocksize 128: 20% weight error, perplexity 1.9 million), though its quantization is right.  CUDA's
    kernels are not checked here (no GPU): the refusal is for the CPU only."""
    if lin.weight.device.type != "cpu" or lin.in_features % blocksize == 0:
        return
    fits = min(lin.in_features & -lin.in_features, 4096)  # the largest power of two dividing the inputs
    hint = f"use {scheme}:blocksize={fits} or smaller" if fits >= 32 else f"{scheme} cannot run this model on the CPU"
    raise UsageError(f"{scheme}:blocksize={blocksize}: a layer has {lin.in_features} inputs, not a multiple of "
                     f"{blocksize}, and bitsandbytes' CPU kernels de-quantize such layers wrongly; {hint}")


register(BnbInt8(name="int8"), "bitsandbytes LLM.int8 weights (threshold 6.0), real kernels", aliases=("llm.int8",))
register(Bnb4bit(name="nf4", quant_type="nf4"), "bitsandbytes 4-bit NormalFloat weights, real kernels")
register(Bnb4bit(name="fp4", quant_type="fp4"), "bitsandbytes 4-bit float weights, real kernels")
