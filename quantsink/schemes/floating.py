"""Float references: ``fp32`` (the reference itself) and ``bf16`` / ``fp16`` casts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from . import QuantContext, Scheme, register


@dataclass(frozen=True)
class FloatScheme(Scheme):
    """Cast every weight to ``dtype``; logits are scored in float32 regardless."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def bits(self) -> float:
        return {"float32": 32.0, "bfloat16": 16.0, "float16": 16.0}[self.dtype]

    @property
    def bit_widths(self) -> dict[str, int | None]:
        bits = int(self.bits)
        return {"weights": bits, "activations": bits, "kv": bits}

    def apply(self, model: Any, ctx: QuantContext) -> Any:
        from quantsink.data.models import torch_dtype

        return model.to(torch_dtype(self.dtype))


register(FloatScheme(name="fp32", dtype="float32"), "float32 reference weights (no quantization)")
register(FloatScheme(name="bf16", dtype="bfloat16"), "bfloat16 weights and activations")
register(FloatScheme(name="fp16", dtype="float16"), "float16 weights and activations")
