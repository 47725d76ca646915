"""``cushion[:length=2,candidates=32,windows=2,tokens=64,seed=0]``: a searched prefix whose keys and values are
kept in full precision (CushionCache, Son et al. 2024, arXiv 2406.12016; the greedy search, without the
prefix tuning that follows it in the paper).

Search, on calibration windows only (the float reference, never the evaluation windows): ``candidates``
token ids are drawn from the vocabulary with ``seed``; greedily, for each of ``length`` prefix positions, the
candidate is chosen that minimises the objective with the tokens chosen so far in front of it.  The
objective: over the first ``windows`` calibration windows cut to ``tokens`` tokens, the sum over the
quantized sites (the input of every Linear the scheme quantizes; q/k/v share one input, counted once) of the
largest |activation| of the tokens after the prefix (and after the windows' own sink positions, e.g. BOS),
averaged over the windows: the per-tensor range each site would need.  Cost: ``length`` forwards of
``candidates x windows`` rows of ``length + tokens`` tokens, on the float reference, once per process for a
given reference model and calibration windows (the result is reused across schemes; ``search_reused``).

Evaluation: the chosen tokens are prepended to every window (unscored, like ``sink-token``); their keys and
values, with any BOS after them, are computed once by the float reference and handed to the quantized model
as its KV cache (like ``intact-kv``), so the quantized model never processes (and static calibration never
sees) the prefix.  The record lists the chosen tokens and the objective before and after each step.
"""

from __future__ import annotations

import copy
import hashlib
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager, Iterator

import torch

from ..errors import QuantsinkError
from quantsink.hooks.sites import FQN, Hook, attach
from ..schemes import default_filter
from . import Env, Mitigation, register
from ._layers import cache_kwarg
from .intact_kv import keep_prefix, prefix_length, reference_prefix
from .sink_fp import require_token_scheme
from .sink_token import prepend


SEARCHED: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], dict[str, Any]]]" = weakref.WeakKeyDictionary()


def site_maxima(model: Any, skip: int, into: list[torch.Tensor], mask: torch.Tensor) -> ContextManager[Any]:
    """Append, per quantized site, each row's largest |activation| over positions ``>= skip``.  (B,) per site"""
    last: list[Any] = [None]

    def grab(x: torch.Tensor) -> None:  # (B, T, C)
        if x is last[0]:  # q/k/v (gate/up) read one tensor: count it once
            return
        last[0] = x
        into.append((x[:, skip:].float().abs() * mask[:, skip:, None]).amax(dim=(1, 2)))  # (B,)

    linears = [fqn for fqn, m in model.named_modules() if fqn and default_filter(m, fqn)]
    return attach(model, {f"{FQN}{fqn}": Hook(grab, "input") for fqn in linears})


@torch.no_grad()
def objective(model: Any, ids: torch.Tensor, mask: torch.Tensor, skip: int) -> torch.Tensor:
    """Sum over quantized sites of the largest |activation| at positions ``>= skip``, per row.  (B,)"""
    maxima: list[torch.Tensor] = []
    device = model.get_input_embeddings().weight.device
    with site_maxima(model, skip, maxima, mask.to(device)):
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return torch.stack(maxima).sum(0).cpu()  # (B,)


def with_prefix(prefix: list[int], body: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Rows ``prefix + [c] + body[w]`` for every candidate ``c`` (outer) and window ``w`` (inner).  (C*W, p+1+t)"""
    c, w = len(pool), body.shape[0]
    head = torch.tensor(prefix, dtype=body.dtype).expand(c * w, len(prefix))  # (C*W, p)
    cand = pool.to(body.dtype).repeat_interleave(w)[:, None]  # (C*W, 1)
    return torch.cat([head, cand, body.repeat(c, 1)], 1)


@torch.no_grad()
def greedy_prefix(model: Any, windows: Any, length: int, pool: torch.Tensor, tokens: int) -> dict[str, Any]:
    """The greedy search of the module doc -> chosen ids, the objective before and after each step."""
    body, body_mask = windows.input_ids[:, :tokens], windows.attention_mask[:, :tokens]  # (W, t)
    sinks = prefix_length(tuple(windows.sink_positions)) if windows.sink_positions else 0
    w = body.shape[0]
    before = float(objective(model, body, body_mask, sinks).mean())
    chosen: list[int] = []
    steps: list[float] = []
    for step in range(length):
        ids = with_prefix(chosen, body, pool)  # (C*W, step+1+t)
        mask = torch.cat([torch.ones(len(ids), step + 1, dtype=body_mask.dtype), body_mask.repeat(len(pool), 1)], 1)
        score = objective(model, ids, mask, step + 1 + sinks).view(len(pool), w).mean(1)  # (C,)
        best = int(score.argmin())
        chosen.append(int(pool[best]))
        steps.append(float(score[best]))
    return {"token_ids": chosen, "objective_without": before, "objective_per_step": steps}


@dataclass(frozen=True)
class Cushion(Mitigation):
    length: int = 2
    candidates: int = 32
    windows: int = 2
    tokens: int = 64
    seed: int = 0
    hides_prefix: ClassVar[bool] = True
    changes_input: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if min(self.length, self.candidates, self.windows) < 1 or self.tokens < 2:
            raise ValueError("length, candidates and windows must be >= 1 and tokens >= 2")

    def check(self, scheme: Any) -> None:
        require_token_scheme("cushion", scheme)

    def prefix(self, env: Env) -> list[int]:
        """The searched prefix, searched once per run (calibration windows seen without this prefix)."""
        if "token_ids" not in env.notes:
            if env.calibration is None or env.reference is None:
                raise QuantsinkError("cushion searches its prefix on calibration windows; none were given")
            env.state["searching"] = True
            try:
                calib = env.calibration().subset(slice(0, self.windows))
            finally:
                env.state.pop("searching")
            env.notes.update(self.search(env.reference, calib))
            names = env.tokenizer.convert_ids_to_tokens(env.notes["token_ids"]) if env.tokenizer else []
            env.notes["tokens"] = [str(t) for t in names]
        return env.notes["token_ids"]

    def search(self, reference: Any, calib: Any) -> dict[str, Any]:
        """The greedy search, once per (reference model, calibration ids, parameters) in a process:
        it depends on neither the scheme nor the other mitigations (a sweep searches once per model and corpus)."""
        key = (hashlib.sha256(calib.input_ids.numpy().tobytes()).hexdigest(), self.spec())
        memo = SEARCHED.setdefault(reference, {})
        if key in memo:
            return {**memo[key], "search_reused": True, "search_s": 0.0, "search_s_original": memo[key]["search_s"]}
        vocab = reference.get_input_embeddings().weight.shape[0]
        pool = torch.randperm(vocab, generator=torch.Generator().manual_seed(self.seed))[:self.candidates]
        t0 = time.perf_counter()
        found = greedy_prefix(reference, calib, self.length, pool, self.tokens)
        memo[key] = {**found, "search_windows": len(calib), "search_tokens": self.tokens, "candidates": len(pool),
                     "search_s": round(time.perf_counter() - t0, 2)}
        return memo[key]

    def transform_windows(self, windows: Any, env: Env) -> Any:
        if env.state.get("searching"):
            return windows
        for token in reversed(self.prefix(env)):
            windows = prepend(windows, token)
        return windows

    def quant_context(self, ctx: Any, env: Env) -> Any:
        return keep_prefix(ctx, env.calibration().sink_positions)

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
            if not torch.equal(ids[:, :p], ids[:1, :p].expand(len(ids), p)):
                raise QuantsinkError("cushion: the windows do not begin with one prefix (another mitigation "
                                     "replaced it, e.g. intact-kv); use cushion without it")
            if "prefix" not in state:  # computed once, in full precision, by the reference
                state["prefix"] = reference_prefix(env.reference, ids[:1], mask[:1], p, dtype)
            cache, logits = state["prefix"]
            cache = copy.deepcopy(cache)
            cache.batch_repeat_interleave(len(ids))
            state["logits"] = logits.expand(len(ids), -1, -1)
            return args, {**kwargs, "input_ids": ids[:, p:], "attention_mask": mask, name: cache, "use_cache": True}

        def post(output: Any) -> Any:
            output.logits = torch.cat([state.pop("logits").to(output.logits.dtype), output.logits], 1)  # (B, T, V)
            return output

        env.notes.update(prefix_length=p, how="prefix KV computed once by the float reference, handed to the "
                         "quantized model as its KV cache; prefix never scored, never calibrated")
        # prepend: before the scheme's own hooks on the model call, so they see the ids and cache it gets
        with attach(model, {"model": [Hook(pre, "call", prepend=True), Hook(post)]}, known={"model": model}):
            yield


register(Cushion(name="cushion"), "CushionCache: a greedily searched prefix (on calibration windows) whose KV "
         "the float reference computes once; minimises the quantized sites' largest activations")
