"""The extreme-token statistics collector.

:class:`StatsCollector` rides on the evaluator's ``batch_context``: on the first ``stats_windows``
windows it attaches its probes (through :func:`quantsink.hooks.sites.attach`), reduces each batch on
the fly into small per-window accumulators (never every layer's attention matrices at once), and hands
the result to the pure functions of :mod:`quantsink.measure.stats`.  The scored forward runs the same
kernels with and without stats, so every metric is bitwise the same either way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from quantsink.errors import QuantsinkError
from quantsink.hooks.sites import Hook, HookLike, attach, find_blocks, hidden_of, sites
from quantsink.measure import stats as S


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
