"""Every way quantsink touches a model: canonical sites, one context-managed ``attach``, the hooks every stage uses.

Sites are found generically, never per architecture (:func:`sites` is the one
discovery function; schemes, mitigations and probes all address the model
through it):

* ``model`` is the model itself (its call: ``input_ids``, ``attention_mask``, the
  KV cache) and ``head`` its output embedding;
* the decoder blocks are the longest ``nn.ModuleList`` whose every element holds
  an attention module (a module whose class name ends in ``Attention``);
* ``layers.{i}`` is block i (its output is the residual stream after the block);
* ``layers.{i}.attn`` is the block's attention module;
* ``layers.{i}.attn.v_proj`` is the attention's value projection;
* ``layers.{i}.<path>.in`` is the input of each Linear-like module (``nn.Linear``
  or anything with ``in_features``/``out_features``, e.g. a bitsandbytes or a
  wrapped, quantized Linear; the outermost one when nested), with the attention
  path written ``attn`` and the MLP path ``mlp``: ``layers.12.mlp.down_proj.in``.

:func:`attach` registers :class:`Hook` s by site name, checks every name
resolved before anything is attached, and removes every handle in ``finally``.
A hook sees a site's output (and may replace it), its first input (and may
replace it), its whole call (positional and keyword arguments, e.g. the
model's ``input_ids`` and cache), or, at an attention module, the attention
probabilities of the forward, computed beside the model's own attention kernel
so the forward's numbers do not change.

The attention probabilities come from :mod:`quantsink.hooks.probes`; the
statistics collector that rides on these hooks is :mod:`quantsink.measure.collector`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from quantsink.errors import QuantsinkError
from quantsink.hooks.probes import attention_probes

On = Literal["output", "input", "call", "attention"]


@dataclass(frozen=True)
class Hook:
    """What runs at a site, and what it sees.

    * ``output``: ``fn(output)``; a non-None return replaces the output;
    * ``input``: ``fn(x)`` with the first positional input; a non-None return replaces it;
    * ``call``: ``fn(args, kwargs)`` before the module runs; a non-None return is the new ``(args, kwargs)``;
    * ``attention`` (attention modules only): ``fn(probs, row)`` for each row (window) of the batch
      in order, with that row's attention probabilities ``(1, H, T, S)`` (float32; one row at a
      time, so never a whole batch of attention matrices), never changing the forward.

    ``prepend`` runs it before hooks already registered on that module.
    """

    fn: Callable[..., Any]
    on: On = "output"
    prepend: bool = False


HookLike = Hook | Callable[..., Any]
FQN = "fqn:"  # site-name prefix: a module by its path in the model (``fqn:model.layers.0.self_attn``)


# --------------------------------------------------------------------------- site discovery


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def _first(block: nn.Module, test: Callable[[nn.Module], bool]) -> tuple[str, nn.Module] | None:
    found = [(name, m) for name, m in block.named_modules() if name and test(m)]
    return min(found, key=lambda nm: nm[0].count(".")) if found else None


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the longest ModuleList whose elements all hold an attention module."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
             and all(_first(block, _is_attention) for block in m)]
    if not lists:
        raise QuantsinkError(f"{type(model).__name__}: no list of decoder blocks with attention modules found; "
                             f"quantsink needs a decoder-only transformer")
    return max(lists, key=len)


def _canonical(path: str, attn_path: str, mlp_path: str | None) -> str:
    """Block-relative module path -> canonical path (attention -> attn, MLP -> mlp)."""
    for own, canon in ((attn_path, "attn"), (mlp_path, "mlp")):
        if own and (path == own or path.startswith(own + ".")):
            return canon + path[len(own):]
    return path


def block_sites(block: nn.Module, index: int) -> dict[str, nn.Module]:
    """Canonical site name -> module for one decoder block."""
    attn_path, attn = _first(block, _is_attention)  # type: ignore[misc]
    mlp = _first(block, lambda m: type(m).__name__.endswith(("MLP", "FeedForward", "Mlp")))
    mlp_path = mlp[0] if mlp else None
    prefix = f"layers.{index}"
    sites: dict[str, nn.Module] = {prefix: block, f"{prefix}.attn": attn}
    linears = [(name, m) for name, m in block.named_modules() if name and _is_linear(m)]
    outer = [(n, m) for n, m in linears if not any(n.startswith(o + ".") for o, _ in linears)]
    for name, module in outer:
        canon = _canonical(name, attn_path, mlp_path)
        sites[f"{prefix}.{canon}.in"] = module
        if canon.startswith("attn.") and canon.rsplit(".", 1)[-1] in ("v_proj", "value", "v"):
            sites[f"{prefix}.attn.v_proj"] = module
    return sites


def sites(model: nn.Module) -> dict[str, nn.Module]:
    """Every canonical site of the model: ``model``, ``head``, then the blocks' sites in forward order."""
    out: dict[str, nn.Module] = {"model": model}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        out["head"] = head
    for i, block in enumerate(find_blocks(model)):
        out.update(block_sites(block, i))
    return out


def layer_sites(model: nn.Module) -> dict[str, nn.Module]:
    """``{"layers.{i}": block}``: the decoder blocks under their canonical names."""
    return {f"layers.{i}": block for i, block in enumerate(find_blocks(model))}


def hidden_of(output: Any) -> torch.Tensor:
    """The residual state a decoder block returns (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its residual state replaced by ``hidden``."""
    if isinstance(output, (tuple, list)):
        return type(output)((hidden, *output[1:]))
    return hidden


# --------------------------------------------------------------------------- attach


def _as_hooks(name: str, value: HookLike | Sequence[HookLike]) -> list[Hook]:
    """Plain callables see the input at ``.in`` sites and the output elsewhere."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [v if isinstance(v, Hook) else Hook(v, "input" if name.endswith(".in") else "output") for v in values]


def _on_input(fn: Callable[..., Any]) -> Callable[..., Any]:
    def pre(module: nn.Module, args: tuple) -> tuple | None:
        new = fn(args[0]) if args else None
        return None if new is None else (new, *args[1:])
    return pre


_REGISTER: dict[str, Callable[[nn.Module, Hook], Any]] = {
    "output": lambda m, h: m.register_forward_hook(lambda mod, args, out: h.fn(out), prepend=h.prepend),
    "input": lambda m, h: m.register_forward_pre_hook(_on_input(h.fn), prepend=h.prepend),
    "call": lambda m, h: m.register_forward_pre_hook(lambda mod, args, kwargs: h.fn(args, kwargs),
                                                    with_kwargs=True, prepend=h.prepend),
}


@contextmanager
def attach(model: nn.Module, hooks: Mapping[str, HookLike | Sequence[HookLike]], *,
           known: Mapping[str, nn.Module] | None = None) -> Iterator[None]:
    """Attach ``{site: hook or [hooks]}`` for the duration of the block; every handle is removed in ``finally``.

    Sites are canonical names (:func:`sites`), or ``fqn:<path>`` for a module by its own path
    (what a scheme that wraps modules by path attaches to), unless ``known`` names them
    otherwise.  Unknown names raise before anything is attached.
    """
    known = {**(known if known is not None else sites(model)), **_by_path(model, hooks)}
    missing = [name for name in hooks if name not in known]
    if missing:
        raise QuantsinkError(f"unknown hook site(s) {', '.join(missing[:5])}; e.g. {', '.join(list(known)[:4])}")
    pairs = [(known[name], hook) for name, value in hooks.items() for hook in _as_hooks(name, value)]
    with ExitStack() as stack:
        probes = {module: hook.fn for module, hook in pairs if hook.on == "attention"}
        if probes:
            stack.enter_context(attention_probes(model, probes))
        for module, hook in pairs:
            if hook.on != "attention":
                stack.callback(_REGISTER[hook.on](module, hook).remove)
        yield


def _by_path(model: nn.Module, names: Any) -> dict[str, nn.Module]:
    paths = {name: name[len(FQN):] for name in names if name.startswith(FQN)}
    modules = dict(model.named_modules())
    return {name: modules[path] for name, path in paths.items() if path in modules}


def attached_hooks(model: nn.Module) -> int:
    """How many forward hooks and pre-hooks are registered anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
