"""The common evaluator: one pass per window set, the same for reference and candidate.

Protocol (stated again in every record under ``protocol``):

* Windows come from ``corpus.sliding_windows``: ``window`` tokens, starts every
  ``stride`` tokens, an optional prepended BOS that is never scored; a token is
  scored exactly once, from the window that first reaches it.
* Per window: the summed negative log-likelihood (nats) of its scored tokens,
  their count and their UTF-8 bytes.
* ``ppl = exp(sum NLL / sum scored)`` (token perplexity), ``bits_per_byte =
  sum NLL / ln 2 / sum bytes``.
* ``kl``: mean over scored tokens of KL(reference || candidate) of the full
  next-token distributions, exact: the reference pass keeps the float32 input of
  the output head at each scored position, and the candidate pass rebuilds the
  reference logits from it with the reference's own head (no second reference
  forward, no top-k truncation).
* ``top1_agreement``: share of scored positions where the candidate's argmax is
  the reference's argmax.
* Logits are scored in float32 whatever the model dtype.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

from .corpus import Windows

BatchContext = Callable[[slice, Windows], ContextManager[Any]]


@dataclass
class Targets:
    """What the candidate pass needs from the reference: the float32 input of the
    output head at every scored position, in window order.  (S, H)"""

    hidden: torch.Tensor  # (S, H) float32


@dataclass
class PassResult:
    """Per-window sums from one pass; metrics derive from them."""

    nll: torch.Tensor  # (N,) float64 summed NLL per window
    n_scored: torch.Tensor  # (N,) int64
    nbytes: torch.Tensor  # (N,) int64
    kl: torch.Tensor | None = None  # (N,) float64 summed KL per window
    top1: torch.Tensor | None = None  # (N,) int64 agreeing positions per window
    targets: Targets | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        total = float(self.n_scored.sum())
        nll = float(self.nll.sum())
        out: dict[str, Any] = {
            "ppl": math.exp(nll / total),
            "nll_per_token": nll / total,
            "bits_per_byte": nll / math.log(2) / float(self.nbytes.sum()),
            "nll_per_window": [round(float(x), 6) for x in self.nll],
            "scored_per_window": [int(x) for x in self.n_scored],
        }
        if self.kl is not None and self.top1 is not None:
            out["kl"] = float(self.kl.sum()) / total
            out["top1_agreement"] = float(self.top1.sum()) / total
            out["kl_per_window"] = [round(float(x), 6) for x in self.kl]
        return out


def input_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


@dataclass
class ReferenceHead:
    """Rebuilds reference log-probs from cached head inputs: the reference's own
    output embedding, plus logit soft-capping where the config has it."""

    head: Any  # the reference model's output embedding module
    softcap: float | None = None

    @classmethod
    def of(cls, model: Any) -> "ReferenceHead":
        return cls(model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None))

    def logp(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight
        logits = self.head(hidden.to(device=weight.device, dtype=weight.dtype)).float()  # (S, V)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.log_softmax(-1)


SCORE_ELEMENTS = 1 << 24  # (positions x vocab) scored per step: temporaries stay ~64 MiB in float32


def pick_rows(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``flat[rows]``: a view when the rows are one contiguous run (every position of a window is
    scored but its last), else a copy; the same values either way."""
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 == len(rows) and torch.equal(rows, torch.arange(first, last + 1, device=rows.device)):
        return flat.narrow(0, first, len(rows))
    return flat.index_select(0, rows)


class _Accumulator:
    """Scores the positions of each batch in steps of ``SCORE_ELEMENTS`` logits: every step's
    temporaries are small and reused (no full (B, T, V) float32 copies); the numbers are those
    of whole-batch scoring, as each step only picks rows (row-wise ops, sums added in order)."""

    def __init__(self, n: int, reference: Targets | None, head: ReferenceHead | None):
        self.nll = torch.zeros(n, dtype=torch.float64)
        self.kl = torch.zeros(n, dtype=torch.float64) if reference is not None else None
        self.top1 = torch.zeros(n, dtype=torch.long) if reference is not None else None
        self.reference, self.head = reference, head
        self.cursor = 0  # scored positions consumed so far (window order)
        self.hidden: list[torch.Tensor] = []

    def add(self, first: int, logits: torch.Tensor, windows: Windows, hidden: torch.Tensor | None) -> None:
        mask = windows.scored[:, 1:].to(logits.device)  # (B, T-1) targets scored
        b, t = mask.nonzero(as_tuple=True)  # (S,) each, window order
        where = b.cpu() + first  # window index of each scored position
        flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V), a view
        rows = b * logits.shape[1] + t  # (S,) row of each scored position in flat
        target = windows.input_ids[:, 1:].to(logits.device)[b, t]  # (S,)
        if hidden is not None:
            self.hidden.append(hidden[:, :-1][mask].float().cpu())  # (S, H)
        step = max(128, SCORE_ELEMENTS // flat.shape[1])
        for lo in range(0, len(rows), step):
            part = slice(lo, lo + step)
            self._score(pick_rows(flat, rows[part]), target[part], where[part], self.cursor + lo)
        self.cursor += len(rows)

    def _score(self, logits: torch.Tensor, target: torch.Tensor, where: torch.Tensor, start: int) -> None:
        """NLL (and KL, top-1 vs the reference) of ``logits`` (c, V), positions ``start..start+c``."""
        logq = logits.float().log_softmax(-1)  # (c, V)
        self.nll.index_add_(0, where, -logq.gather(1, target[:, None])[:, 0].double().cpu())
        if self.reference is not None:
            logp = self.head.logp(self.reference.hidden[start:start + len(target)]).to(logq.device)  # (c, V)
            self.top1.index_add_(0, where, (logp.argmax(1) == logq.argmax(1)).long().cpu())
            kl = torch.nn.functional.kl_div(logq, logp, reduction="none", log_target=True)  # exp(p) (p - q)
            self.kl.index_add_(0, where, kl.sum(1).double().cpu())

    def targets(self) -> Targets | None:
        return Targets(torch.cat(self.hidden)) if self.hidden else None


class _HeadInput:
    """Captures the input of the output head during a forward (attached while the pass runs)."""

    def __init__(self, model: Any, active: bool):
        self.model, self.active = model, active
        self.value: torch.Tensor | None = None

    def attached(self) -> ContextManager[Any]:
        from .hooks import Hook, attach

        if not self.active:
            return nullcontext()
        head = self.model.get_output_embeddings()
        return attach(self.model, {"head": Hook(self._grab, "input")}, known={"head": head})

    def _grab(self, x: torch.Tensor) -> None:
        self.value = x


def batches(windows: Windows, batch_tokens: int, boundaries: tuple[int, ...] = ()) -> list[slice]:
    """Row slices of about ``batch_tokens`` tokens that never straddle a boundary row."""
    per = max(1, batch_tokens // windows.input_ids.shape[1])
    cuts = sorted({0, len(windows), *(b for b in boundaries if 0 < b < len(windows))})
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        out.extend(slice(s, min(s + per, hi)) for s in range(lo, hi, per))
    return out


@torch.inference_mode()
def run_pass(model: Any, windows: Windows, *, reference: Targets | None = None,
             reference_head: ReferenceHead | None = None, keep_targets: bool = False,
             batch_tokens: int = 2048, batch_context: BatchContext | None = None,
             boundaries: tuple[int, ...] = (), progress: Callable[[int], None] | None = None) -> PassResult:
    """Score every window once.

    ``reference`` (with ``reference_head``) enables KL and top-1 agreement;
    ``keep_targets`` makes this the reference pass.  ``batch_context(rows, windows)``
    wraps each forward (the stats probes ride on it); ``boundaries`` are rows that
    batches must not straddle.
    """
    if reference is not None and reference_head is None:
        raise ValueError("a reference needs the reference_head that rebuilds its logits")
    device = input_device(model)
    acc = _Accumulator(len(windows), reference, reference_head)
    start = time.perf_counter()
    head_input = _HeadInput(model, keep_targets)
    with head_input.attached():
        for rows in batches(windows, batch_tokens, boundaries):
            part = windows.subset(rows).trimmed()  # right padding all rows share is not computed
            with batch_context(rows, part) if batch_context else nullcontext():
                out = model(input_ids=part.input_ids.to(device),
                            attention_mask=part.attention_mask.to(device), use_cache=False)
            acc.add(rows.start, out.logits, part, head_input.value)
            head_input.value = None
            del out
            if progress:
                progress(rows.stop - rows.start)
    n_scored = windows.scored[:, 1:].sum(1)
    return PassResult(acc.nll, n_scored, windows.nbytes, acc.kl, acc.top1, acc.targets(),
                      seconds=time.perf_counter() - start)
