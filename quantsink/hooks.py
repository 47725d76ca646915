"""Forward hooks on standard HF modules, with canonical site names, and the stats collector.

Sites are found generically, never per architecture:

* the decoder blocks are the longest ``nn.ModuleList`` whose every element holds
  an attention module (a module whose class name ends in ``Attention``);
* ``layers.{i}`` is block i (its output is the residual stream after the block);
* ``layers.{i}.attn`` is the block's attention module (eager attention returns
  the probabilities as its second output);
* ``layers.{i}.attn.v_proj`` is the attention's value projection;
* ``layers.{i}.<path>.in`` is the input of each Linear-like module (``nn.Linear``
  or anything with ``in_features``/``out_features``, e.g. a bitsandbytes or a
  wrapped, quantized Linear; the outermost one when nested), with the attention
  path written ``attn`` and the MLP path ``mlp``: ``layers.12.mlp.down_proj.in``.

:func:`attach` registers hooks by site name, checks every name resolved, and
removes every handle in ``finally``.  :class:`StatsCollector` rides on the
evaluator's ``batch_context``: on the first ``stats_windows`` windows it
switches the model to eager attention, reduces each batch on the fly into small
per-window accumulators (never every layer's attention matrices at once), and
hands the result to the pure functions of :mod:`quantsink.stats`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import stats as S
from .errors import QuantsinkError

Hook = Callable[..., Any]


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
                             f"quantsink's probes need a decoder-only transformer")
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
    """Every canonical site of the model, in forward order."""
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(find_blocks(model)):
        out.update(block_sites(block, i))
    return out


def _kind(name: str) -> str:
    """``pre`` (sees the module input) for ``.in`` sites, ``post`` (sees the output) otherwise."""
    return "pre" if name.endswith(".in") else "post"


@contextmanager
def attach(model: nn.Module, hooks: dict[str, Hook], *, known: dict[str, nn.Module] | None = None) -> Iterator[None]:
    """Register ``{site: fn}`` forward hooks; every handle is removed in ``finally``.

    ``.in`` sites get ``fn(x)`` with the module's first input; other sites get
    ``fn(output)``.  Unknown names raise before anything is attached.
    """
    known = known if known is not None else sites(model)
    missing = [name for name in hooks if name not in known]
    if missing:
        raise QuantsinkError(f"unknown hook site(s) {', '.join(missing[:5])}; e.g. {', '.join(list(known)[:4])}")
    handles = []
    try:
        for name, fn in hooks.items():
            module = known[name]
            if _kind(name) == "pre":
                handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: fn(args[0]) if args else None))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, fn=fn: fn(out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Switch the model's attention implementation (e.g. to ``eager``) and back in ``finally``."""
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


@contextmanager
def serial() -> Iterator[None]:
    """Run CPU reductions on one thread: they are small and memory-bound, and on a busy
    machine an intra-op thread barrier costs 10-100x more than the reduction itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _serially(fn: Hook) -> Hook:
    def run(*args: Any) -> Any:
        with serial():
            return fn(*args)
    return run


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


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
        self.key_attn: list[torch.Tensor | None] = []  # L x (B, H, T)
        self.v_norms: list[torch.Tensor] = []  # L x (B, T, KVH)
        self.linear: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # site -> ((B, T) absmax, moments)
        self.maps: list[torch.Tensor] = []  # L x (H, m, m) attention of the first window, cropped
        self.last: tuple[torch.Tensor | None, Any] = (None, None)  # shared input memo (q/k/v see one tensor)


class StatsCollector:
    """Collects extreme-token statistics during ``run_pass``.

    Use as ``with StatsCollector(model, stats_windows=8) as c: run_pass(...,
    batch_context=c.batch_context, boundaries=c.boundaries)``, then
    ``c.summary(sink_positions)``.  Only the first ``stats_windows`` rows are
    probed (with eager attention); the rest run untouched.  ``keep_maps=m``
    keeps the top-left ``m x m`` attention map of every head on the first
    window (for plots; never recorded).
    """

    def __init__(self, model: nn.Module, *, stats_windows: int = 8, k: float = S.DEFAULT_K,
                 tau: float = S.DEFAULT_TAU, keep_maps: int = 0):
        self.model, self.stats_windows, self.k, self.tau, self.keep_maps = model, stats_windows, k, tau, keep_maps
        self.sites = sites(model)
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
        with attention_implementation(self.model, "eager"), attach(self.model, self._hooks(rows),
                                                                   known=self.sites):
            yield
        with serial():
            self._finish(self._batch, rows)
        self._batch = None

    # -- hooks: each reduces its tensor at once into the batch accumulators

    def _hooks(self, rows: slice) -> dict[str, Hook]:
        hooks: dict[str, Hook] = {}
        for name in self.sites:
            if name.endswith(".in"):
                hooks[name] = lambda x, name=name: self._on_linear(name, x)
            elif name.endswith(".attn"):
                hooks[name] = lambda out, first=rows.start == 0: self._on_attention(out, first)
            elif name.endswith(".v_proj"):
                hooks[name] = self._on_value
            else:
                hooks[name] = self._on_block
        return {name: _serially(fn) for name, fn in hooks.items()}

    def _on_block(self, out: Any) -> None:
        h = _first_tensor(out)  # (B, T, C)
        self._batch.norms.append(S.token_norms(h).to(self.home))
        self._batch.massive.append({k: v.to(self.home) for k, v in S.massive_activation(h).items()})

    def _on_attention(self, out: Any, first: bool) -> None:
        probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None  # (B, H, T, T)
        if not isinstance(probs, torch.Tensor):
            self._batch.key_attn.append(None)
            return
        self._batch.key_attn.append(S.key_attention(probs).to(self.home))
        if self.keep_maps and first:
            m = self.keep_maps
            self._batch.maps.append(probs[0, :, :m, :m].float().cpu())

    def _on_value(self, out: Any) -> None:
        v = _first_tensor(out)  # (B, T, KVH*D)
        if self.head_dim is None or v.shape[-1] % self.head_dim:
            return
        v = v.reshape(*v.shape[:-1], -1, self.head_dim)  # (B, T, KVH, D)
        self._batch.v_norms.append(torch.linalg.vector_norm(v.float(), dim=-1).to(self.home))

    def _on_linear(self, name: str, x: torch.Tensor) -> None:
        batch = self._batch
        if batch.last[0] is not x:  # q/k/v and gate/up share one input: reduce it once
            batch.last = (x, (S.token_absmax(x), S.moments(x)))
        batch.linear[name] = batch.last[1]

    # -- per batch: extreme tokens, then per-window numbers

    def _finish(self, batch: _Batch, rows: slice) -> None:
        batch.last = (None, None)
        if len(batch.norms) != self.n_layers:
            raise QuantsinkError(f"stats probes saw {len(batch.norms)} of {self.n_layers} decoder blocks")
        norms = torch.stack(batch.norms)  # (L, B, T)
        extreme = S.extreme_tokens(norms, self.k)  # (B, T)
        sink_mask = extreme.clone()
        sink_mask[:, 0] = True  # the sink set: key 0 and every extreme token
        attn = self._attention(batch, extreme, sink_mask)
        drain = torch.stack([S.value_drain_from_norms(n) for n in batch.v_norms], 1) \
            if len(batch.v_norms) == self.n_layers else None  # (B, L, KVH)
        for b in range(norms.shape[1]):
            self.windows.append(self._window(b, norms, batch, extreme, attn, drain))
        self._merge_linear(batch, extreme)
        if batch.maps:
            self.maps = torch.stack(batch.maps)  # (L, H, m, m)

    def _attention(self, batch: _Batch, extreme: torch.Tensor, sink_mask: torch.Tensor) -> dict[str, Any]:
        if len(batch.key_attn) != self.n_layers or any(a is None for a in batch.key_attn):
            return {}
        key_attn = torch.stack(batch.key_attn, 1)  # (B, L, H, T)
        flat = key_attn.flatten(1, 2)  # (B, L*H, T)
        shape = key_attn.shape[:3]
        return {"sink": key_attn[..., 0],
                "extreme_attn": S.attention_on(flat, extreme.to(flat.device)).view(shape),
                "sink_set": S.attention_on(flat, sink_mask.to(flat.device)).view(shape)}

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
                             extreme_attn=stack("extreme_attn"), sink_set=stack("sink_set"),
                             drain=stack("drain"), linear=self.linear)

    def summary(self, sink_positions: tuple[int, ...] = ()) -> dict[str, Any]:
        """JSON-ready stats (see :func:`quantsink.stats.summarize`)."""
        return S.summarize(self.window_stats(), k=self.k, tau=self.tau, sink_positions=sink_positions)


# --------------------------------------------------------------------------- the evaluator's pass, with stats


def stats_settings(config: Any) -> dict[str, Any] | None:
    """What determines the stats of a pass (part of the reference cache key); None when off."""
    if not config.stats or config.stats_windows == 0:
        return None
    return {"windows": config.stats_windows, "k": S.DEFAULT_K, "tau": S.DEFAULT_TAU, "version": S.STATS_VERSION}


def stats_pass(config: Any, model: nn.Module, windows: Any, **kwargs: Any) -> Any:
    """``run_pass`` with the stats probes riding on it (same forward); stats land in ``result.extra["stats"]``."""
    from .evaluate import run_pass

    if stats_settings(config) is None:
        return run_pass(model, windows, **kwargs)
    with StatsCollector(model, stats_windows=config.stats_windows) as collector:
        result = run_pass(model, windows, batch_context=collector.batch_context,
                          boundaries=collector.boundaries, **kwargs)
    result.extra["stats"] = collector.summary(tuple(windows.sink_positions))
    return result
