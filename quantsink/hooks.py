"""Every way quantsink touches a model: canonical sites, one context-managed ``attach``, the stats collector.

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

:class:`StatsCollector` rides on the evaluator's ``batch_context``: on the
first ``stats_windows`` windows it attaches its probes, reduces each batch on
the fly into small per-window accumulators (never every layer's attention
matrices at once), and hands the result to the pure functions of
:mod:`quantsink.stats`.  The scored forward runs the same kernels with and
without stats, so every metric is bitwise the same either way.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from . import stats as S
from .errors import QuantsinkError

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


# --------------------------------------------------------------------------- attention probabilities


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float | None = None, softcap: float | None = None,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = 128) -> torch.Tensor:
    """Attention probabilities as eager attention defines them, in float32.

    ``query`` (B, H, T, D) and ``key`` (B, KVH, S, D) as the attention kernel gets them (after
    rotary embedding and any cache); ``mask``: None (causal), bool (True attends) or additive,
    broadcastable to (B, H, T, S).  ``out``: two float32 buffers of B*H*T*S elements (scores,
    probabilities) reused across calls: a fresh multi-MB tensor per call costs more in page
    faults than the arithmetic.  Causal (``mask`` None): computed in blocks of ``block`` queries
    against the keys they can see only (5/8 of the work at T = 4 blocks).  -> (B, H, T, S)
    """
    (b, h, t, d), (kvh, s) = query.shape, key.shape[1:3]
    scores, probs = out if out is not None else [torch.empty(b * h * t * s, device=query.device) for _ in "sp"]
    q = query.float() * (scaling if scaling is not None else d ** -0.5)  # (B, H, T, D)
    k = key.float().transpose(2, 3)  # (B, KVH, D, S)
    probs = probs.view(b, h, t, s)
    spans = [(0, t, s)] if mask is not None else \
        [(a, min(a + block, t), min(s, s - t + a + block)) for a in range(0, t, block)]
    for a, z, e in spans:  # queries a..z-1 see keys 0..e-1 at most
        sc = torch.matmul(q[:, :, a:z].reshape(b, kvh, h // kvh * (z - a), d), k[..., :e],  # head h reads KV h // rep
                          out=scores[:b * h * (z - a) * e].view(b, kvh, h // kvh * (z - a), e)).view(b, h, z - a, e)
        if softcap:
            sc.div_(softcap).tanh_().mul_(softcap)
        m = torch.ones(z - a, e, dtype=torch.bool, device=sc.device).tril(s - t + a) if mask is None else mask
        if m.dtype == torch.bool:
            sc.masked_fill_(~m, torch.finfo(sc.dtype).min)  # as eager: a fully masked row is uniform
        else:
            sc.add_(m[..., :s].float())
        torch.softmax(sc, -1, out=probs[:, :, a:z, :e])
        probs[:, :, a:z, e:] = 0
    return probs


def _row_probs(fn: Callable[..., Any], query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
               **kwargs: Any) -> None:
    """``fn(probs, row)`` row by row, in reused buffers: ``probs`` is valid during the call only."""
    size = query.shape[1] * query.shape[2] * key.shape[2]
    buffers = (torch.empty(size, device=query.device), torch.empty(size, device=query.device))
    for row in range(query.shape[0]):
        m = mask if mask is None or mask.dim() < 4 or mask.shape[0] == 1 else mask[row:row + 1]
        fn(attention_probs(query[row:row + 1], key[row:row + 1], m, kwargs.get("scaling"), kwargs.get("softcap"),
                           out=buffers), row)


_PROBES: "weakref.WeakKeyDictionary[nn.Module, Callable[[torch.Tensor], Any]]" = weakref.WeakKeyDictionary()
PROBE_PREFIX = "quantsink_probe_"


def _probe_implementation(inner: str) -> str:
    """An attention implementation that runs ``inner`` unchanged (same kernel, same mask) and hands
    the probabilities of each probed module to its probe; registered once per ``inner``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PROBE_PREFIX + inner
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    kernel = ALL_ATTENTION_FUNCTIONS[inner]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        out = kernel(module, query, key, value, attention_mask, **kwargs)
        probe = _PROBES.get(module)
        if probe is not None:
            _row_probs(probe, query, key, attention_mask, **kwargs)
        return out

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _eager_probs(out: Any, fn: Callable[..., Any]) -> None:
    probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None  # (B, H, T, S)
    if isinstance(probs, torch.Tensor):
        for row in range(probs.shape[0]):
            fn(probs[row:row + 1].float(), row)


@contextmanager
def attention_probes(model: nn.Module, probes: Mapping[nn.Module, Callable[[torch.Tensor], Any]]) -> Iterator[None]:
    """``probes[attention module](probs)`` on every forward of the block, the forward unchanged.

    Eager attention (and quantsink's own, e.g. ReLU attention) returns its weights: they are read
    from each module's output.  Any other kernel keeps running as it is, and the probabilities are
    computed beside it from the query and key it is given (:func:`attention_probs`)."""
    from .attention import returns_weights

    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    with ExitStack() as stack:
        if returns_weights(impl):  # eager, or quantsink's own (ReLU attention): not a softmax to recompute
            for module, fn in probes.items():
                stack.callback(module.register_forward_hook(lambda m, a, out, fn=fn: _eager_probs(out, fn)).remove)
        else:
            for module in probes:
                stack.callback(_PROBES.pop, module, None)
            _PROBES.update(probes)
            stack.enter_context(attention_implementation(model, _probe_implementation(impl)))
        yield


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Switch the model's attention implementation and back in ``finally``."""
    before = model.config._attn_implementation
    if before == name:
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter:
            setter(name)
        else:
            model.config._attn_implementation = name
        yield
    finally:
        if setter:
            setter(before)
        else:
            model.config._attn_implementation = before


# --------------------------------------------------------------------------- the collector


def _head_dim(attn: nn.Module, model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if dim is None and config is not None and getattr(config, "num_attention_heads", None):
        dim = config.hidden_size // config.num_attention_heads
    return dim


class _Batch:
    """Accumulators of one batch (B windows), filled by the hooks."""

    def __init__(self) -> None:
        self.norms: list[torch.Tensor] = []  # L x (B, T)
        self.massive: list[dict[str, torch.Tensor]] = []  # L x {value, position, channel, median_abs}
        self.massive_tokens: list[torch.Tensor] = []  # L x (B, T) bool
        self.key_attn: list[torch.Tensor] = []  # L*B x (1, H, T), layer-major, rows in order
        self.dormant: list[torch.Tensor] = []  # L*B x (1, H) share of dormant queries, as key_attn
        self.v_norms: list[torch.Tensor] = []  # L x (B, T, KVH)
        self.linear: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # site -> ((B, T) absmax, moments)
        self.maps: list[torch.Tensor] = []  # L x (H, m, m) attention of the first window, cropped
        self.last: tuple[torch.Tensor | None, Any] = (None, None)  # shared input memo (q/k/v see one tensor)


class StatsCollector:
    """Collects extreme-token statistics during ``run_pass``.

    Use as ``with StatsCollector(model, stats_windows=8) as c: run_pass(...,
    batch_context=c.batch_context, boundaries=c.boundaries)``, then
    ``c.summary(sink_positions)``.  Only the first ``stats_windows`` rows are
    probed; the rest run untouched, and the probed rows run the same kernels as
    the rest (attention probabilities are computed beside them).  ``keep_maps=m``
    keeps the top-left ``m x m`` attention map of every head on the first
    window (for plots; never recorded).
    """

    def __init__(self, model: nn.Module, *, stats_windows: int = 8, k: float = S.DEFAULT_K,
                 tau: float = S.DEFAULT_TAU, share: float = S.DEFAULT_SHARE, keep_maps: int = 0):
        self.model, self.stats_windows, self.k, self.keep_maps = model, stats_windows, k, keep_maps
        self.tau, self.share = tau, share
        self.sites = {name: m for name, m in sites(model).items() if name.startswith("layers.")}
        self.n_layers = len(find_blocks(model))
        self.windows: list[dict[str, Any]] = []
        self.linear: dict[str, dict[str, Any]] = {}
        self.maps: torch.Tensor | None = None
        self._batch: _Batch | None = None
        self.head_dim = _head_dim(self.sites["layers.0.attn"], model)
        self.home = model.get_input_embeddings().weight.device  # where per-layer reductions gather

    @property
    def boundaries(self) -> tuple[int, ...]:
        return (self.stats_windows,)

    def __enter__(self) -> "StatsCollector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._batch = None

    @contextmanager
    def batch_context(self, rows: slice, windows: Any) -> Iterator[None]:
        """Wraps one forward of ``run_pass``: probes rows below ``stats_windows`` only."""
        if rows.start >= self.stats_windows:
            yield
            return
        if rows.stop > self.stats_windows:
            raise ValueError("a batch straddles the stats windows: pass boundaries=collector.boundaries")
        self._batch = _Batch()
        self._rows = rows.stop - rows.start
        with attach(self.model, self._hooks(rows), known=self.sites):
            yield
        self._finish(self._batch, rows)
        self._batch = None

    # -- hooks: each reduces its tensor at once into the batch accumulators

    def _hooks(self, rows: slice) -> dict[str, HookLike]:
        hooks: dict[str, HookLike] = {}
        for name in self.sites:
            if name.endswith(".in"):
                hooks[name] = lambda x, name=name: self._on_linear(name, x)
            elif name.endswith(".attn"):
                first = rows.start == 0  # the batch holds window 0: keep its maps
                hooks[name] = Hook(lambda probs, row: self._on_attention(probs, first and not row), "attention")
            elif name.endswith(".v_proj"):
                hooks[name] = self._on_value
            else:
                hooks[name] = self._on_block
        return hooks

    def _on_block(self, out: Any) -> None:
        h = hidden_of(out)  # (B, T, C)
        self._batch.norms.append(S.token_norms(h).to(self.home))
        massive = {k: v.to(self.home) for k, v in S.massive_activation(h).items()}
        self._batch.massive_tokens.append(massive.pop("tokens"))
        self._batch.massive.append(massive)

    def _on_attention(self, probs: torch.Tensor, first: bool) -> None:  # (1, H, T, T): one window
        self._batch.key_attn.append(S.key_attention(probs).to(self.home))
        self._batch.dormant.append(S.dormant_queries(probs, self.tau).to(self.home))
        if self.keep_maps and first:
            m = self.keep_maps
            self._batch.maps.append(probs[0, :, :m, :m].to("cpu", torch.float32, copy=True))  # probs is reused

    def _on_value(self, out: Any) -> None:
        v = hidden_of(out)  # (B, T, KVH*D)
        if self.head_dim is None or v.shape[-1] % self.head_dim:
            return
        v = v.reshape(*v.shape[:-1], -1, self.head_dim)  # (B, T, KVH, D)
        self._batch.v_norms.append(torch.linalg.vector_norm(v.float(), dim=-1).to(self.home))

    def _on_linear(self, name: str, x: torch.Tensor) -> None:
        batch = self._batch
        if batch.last[0] is not x:  # q/k/v and gate/up share one input: reduce it once
            tokens = x.view(self._rows, -1, x.shape[-1]) if x.dim() == 2 else x  # OPT flattens to (B*T, C)
            batch.last = (x, (S.token_absmax(tokens), S.moments(tokens)))
        batch.linear[name] = batch.last[1]

    # -- per batch: extreme tokens, then per-window numbers

    def _finish(self, batch: _Batch, rows: slice) -> None:
        batch.last = (None, None)
        if len(batch.norms) != self.n_layers:
            raise QuantsinkError(f"stats probes saw {len(batch.norms)} of {self.n_layers} decoder blocks")
        norms = torch.stack(batch.norms)  # (L, B, T)
        massive = torch.stack(batch.massive_tokens).any(dim=0)  # (B, T)
        extreme = S.extreme_tokens(norms, self.k) | massive  # (B, T)
        attn = self._attention(batch, extreme)
        drain = torch.stack([S.value_drain_from_norms(n) for n in batch.v_norms], 1) \
            if len(batch.v_norms) == self.n_layers else None  # (B, L, KVH)
        for b in range(norms.shape[1]):
            self.windows.append(self._window(b, norms, batch, extreme, attn, drain))
            self.windows[-1]["massive_positions"] = massive[b].nonzero()[:, 0].tolist()
        self._merge_linear(batch, extreme)
        if batch.maps:
            self.maps = torch.stack(batch.maps)  # (L, H, m, m)

    def _attention(self, batch: _Batch, extreme: torch.Tensor) -> dict[str, Any]:
        b = extreme.shape[0]
        if len(batch.key_attn) != self.n_layers * b:
            return {}
        def per_window(rows: list[torch.Tensor]) -> torch.Tensor:  # L*B x (1, ...) -> (B, L, ...)
            return torch.cat(rows).unflatten(0, (self.n_layers, b)).transpose(0, 1)

        key_attn = per_window(batch.key_attn)  # (B, L, H, T)
        flat = key_attn.flatten(1, 2)  # (B, L*H, T)
        shape = key_attn.shape[:3]
        return {"sink": key_attn[..., 0],
                "extreme_attn": S.attention_on(flat, extreme.to(flat.device)).view(shape),
                "dormant_queries": per_window(batch.dormant)}  # (B, L, H)

    def _window(self, b: int, norms: torch.Tensor, batch: _Batch, extreme: torch.Tensor,
                attn: dict[str, Any], drain: torch.Tensor | None) -> dict[str, Any]:
        window = {
            "norm_sink": norms[:, b, 0].cpu(),  # (L,)
            "norm_median": norms[:, b, 1:].median(-1).values.cpu(),  # (L,)
            "massive": {key: torch.stack([m[key][b] for m in batch.massive]).cpu() for key in batch.massive[0]},
            "extreme": extreme[b].nonzero()[:, 0].tolist(),
        }
        window.update({key: value[b].cpu() for key, value in attn.items()})  # (L, H)
        if drain is not None:
            window["drain"] = drain[b].cpu()  # (L, KVH)
        return window

    def _merge_linear(self, batch: _Batch, extreme: torch.Tensor) -> None:
        for name, (tok_absmax, sums) in batch.linear.items():
            entry = self.linear.setdefault(name, {"absmax": 0.0, "absmax_without_extreme": 0.0,
                                                  "moments": torch.zeros(5, dtype=torch.float64)})
            entry["absmax"] = max(entry["absmax"], float(tok_absmax.max()))
            entry["absmax_without_extreme"] = max(entry["absmax_without_extreme"],
                                                  S.absmax_without(tok_absmax, extreme.to(tok_absmax.device)))
            entry["moments"] = entry["moments"] + sums.cpu()

    # -- result

    def window_stats(self) -> S.WindowStats:
        if not self.windows:
            raise QuantsinkError("no stats windows were probed (--stats-windows 0 or no windows)")
        ws = self.windows

        def stack(key: str) -> torch.Tensor | None:
            return torch.stack([w[key] for w in ws]) if key in ws[0] else None

        massive = {key: torch.stack([w["massive"][key] for w in ws]) for key in ws[0]["massive"]}
        return S.WindowStats(norm_sink=stack("norm_sink"), norm_median=stack("norm_median"), massive=massive,
                             extreme=[w["extreme"] for w in ws], sink=stack("sink"),
                             massive_positions=[w["massive_positions"] for w in ws],
                             extreme_attn=stack("extreme_attn"), dormant_queries=stack("dormant_queries"),
                             drain=stack("drain"), linear=self.linear)

    def summary(self, sink_positions: tuple[int, ...] = ()) -> dict[str, Any]:
        """JSON-ready stats (see :func:`quantsink.stats.summarize`)."""
        return S.summarize(self.window_stats(), k=self.k, tau=self.tau, share=self.share,
                           sink_positions=sink_positions)


# --------------------------------------------------------------------------- the evaluator's pass, with stats


def stats_settings(config: Any) -> dict[str, Any] | None:
    """What determines the stats of a pass (part of the reference cache key); None when off."""
    if not config.stats or config.stats_windows == 0:
        return None
    return {"windows": config.stats_windows, "k": S.DEFAULT_K, "tau": config.dormant_attention,
            "dormant_queries": config.dormant_queries,
            "massive": [S.MASSIVE_VALUE, S.MASSIVE_RATIO, S.MASSIVE_TOKEN_RATIO],
            "version": S.STATS_VERSION}

