"""``intact-kv``: the sink's keys and values come from the float reference (IntactKV, Liu et al. 2024).

For each batch, the float reference model runs on the sink prefix of every
window (positions ``0..p-1``: the windows' sink positions, BOS or a prepended
sink token; without one, the first token, which is where a model without BOS
puts its sink) and returns its KV cache.  The quantized model then runs on the
rest of the window with that cache, so it attends to an exact sink.  The
logits at the prefix positions are the reference's (the prefix is computed in
full precision, as in IntactKV).  Since the quantized model never processes
the prefix, static calibration leaves those positions out of its ranges
(``keep_fp_positions``).  Cost: one reference forward over ``p`` tokens per
window, no second pass over the windows.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from quantsink.hooks.sites import Hook, attach
from . import Env, Mitigation, register
from ._layers import cache_kwarg, output_cache


def prefix_length(sink_positions: tuple[int, ...]) -> int:
    """Length of the prefix to take from the reference: through the last sink position, else 1."""
    return max(sink_positions) + 1 if sink_positions else 1


@torch.no_grad()
def reference_prefix(reference: Any, input_ids: torch.Tensor, mask: torch.Tensor, p: int, dtype: Any) -> Any:
    """The reference's KV cache and logits over the first ``p`` positions."""
    out = reference(input_ids=input_ids[:, :p], attention_mask=mask[:, :p], use_cache=True)
    cache = output_cache(out)
    for layer in getattr(cache, "layers", ()):  # follow the candidate's dtype (e.g. bf16 schemes)
        if getattr(layer, "keys", None) is not None and layer.keys.dtype != dtype:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    return cache, out.logits  # (B, p, V)


def keep_prefix(ctx: Any, sinks: Any) -> Any:
    """``ctx`` with the sink prefix (positions ``0..prefix_length(sinks)-1``) kept in full precision."""
    keep = sorted(set(ctx.keep_fp_positions) | set(range(prefix_length(tuple(sinks)))))
    return dataclasses.replace(ctx, keep_fp_positions=tuple(keep))


@dataclass(frozen=True)
class IntactKV(Mitigation):
    hides_prefix: ClassVar[bool] = True

    def quant_context(self, ctx: Any, env: Env) -> Any:
        """The quantized model never processes the prefix: leave it out of static calibration ranges
        (at evaluation those positions are not in its input, so nothing else changes)."""
        sinks = env.calibration().sink_positions if env.calibration else env.sink_positions
        env.notes["calibration"] = "prefix positions left out of static calibration ranges"
        return keep_prefix(ctx, sinks)

    @contextmanager
    def attach(self, model: Any, env: Env) -> Iterator[None]:
        p = prefix_length(env.sink_positions)
        name = cache_kwarg(model)
        dtype = model.get_input_embeddings().weight.dtype
        state: dict[str, Any] = {}

        def pre(args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            ids = kwargs["input_ids"]  # (B, T)
            mask = kwargs.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            cache, state["logits"] = reference_prefix(env.reference, ids, mask, p, dtype)
            return args, {**kwargs, "input_ids": ids[:, p:], "attention_mask": mask, name: cache,
                          "use_cache": True}

        def post(output: Any) -> Any:
            prefix = state.pop("logits").to(output.logits.dtype)  # (B, p, V)
            output.logits = torch.cat([prefix, output.logits], 1)  # (B, T, V)
            return output

        env.notes.update(prefix_length=p, prefix="sink positions" if env.sink_positions else
                         "first token (no BOS or sink token: the first token is the sink)",
                         how="reference KV cache of the prefix passed to the quantized model as its cache")
        # prepend: run before the scheme's own hooks on the model call, so they see the ids and cache it gets
        with attach(model, {"model": [Hook(pre, "call", prepend=True), Hook(post)]}, known={"model": model}):
            yield


register(IntactKV(name="intact-kv"), "the sink's keys and values computed by the float reference and "
         "handed to the quantized model as its KV cache")
