"""The common evaluator: one pass per window set, the same for reference and candidate.

Protocol (stated again in every record under ``protocol``):

* Windows come from ``windows.sliding_windows``: ``window`` tokens, starts every
  ``stride`` tokens, an optional prepended BOS that is never scored; a token is
  scored exactly once, from the window that first reaches it.
* Per window: the summed negative log-likelihood (nats) of its scored tokens,
  their count and their UTF-8 bytes.
* ``ppl = exp(sum NLL / sum scored)`` (token perplexity), ``bits_per_byte =
  sum NLL / ln 2 / sum bytes``.
* ``kl``: mean over scored tokens of KL(reference || candidate) of the full
  next-token distributions (no second reference forward, no top-k truncation).
  The reference pass keeps, per scored position, the float32 input ``h`` of the
  output head, ``sum_v p_v log p_v`` and the expected output embedding
  ``e = sum_v p_v W_v`` (``W`` the head's rows, ``p`` the reference's
  next-token distribution).  When the candidate's output head is the
  reference's (the same float32 weight, no bias, no logit soft-capping), the KL
  follows from the candidate's head input ``h'`` and the log-normaliser ``L'``
  of its logits ``z' = W h'``: ``sum_v p_v log q_v = e . h' - L'``, so
  ``KL = sum_v p_v log p_v - e . h' + L'`` (float64; 0 where ``h' = h``
  bitwise, floored at 0 against rounding).  ``sum_v p_v log p_v`` is kept as
  ``e . h - L``, so the KL is ``e . (h - h') + L' - L`` and ``e``'s float32
  rounding enters only times ``h - h'`` (evaluator 4; within 1e-6 relative of a
  float64 KL from both models' full logits where the KL is large; ~1e-6 nats
  per token, the rounding of the float32 logits, where it is tiny).  Otherwise (a folded, quantized or
  bfloat16 head; a candidate fed a cached prefix, whose head never sees it) the
  candidate pass rebuilds the reference logits from ``h`` with the reference's
  own head and sums ``p (log p - log q)``.
* ``top1_agreement``: share of scored positions where the candidate's argmax is
  the reference's argmax.
* Logits are scored in float32 whatever the model dtype: a position's NLL is
  ``L - z_target`` (float64) with ``L`` the cascade-summed ``logsumexp`` of its
  float32 logits ``z`` (``normaliser``).
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

from quantsink.data.windows import Windows
from quantsink.measure.kernels import fast_linear
from quantsink.measure.pages import kept_pages

BatchContext = Callable[[slice, Windows], ContextManager[Any]]


@dataclass
class Targets:
    """What the candidate pass needs from the reference: the float32 input of the
    output head at every scored position, in window order.  (S, H)"""

    hidden: torch.Tensor  # (S, H) float32
    neg_entropy: torch.Tensor | None = None  # (S,) float64: sum_v p_v log p_v, as e . h - L (``_summarise``)
    expected_embedding: torch.Tensor | None = None  # (S, H) float32: sum_v p_v W_v
    argmax: torch.Tensor | None = None  # (S,) int64: the reference's top-1 token

    @property
    def summarised(self) -> bool:
        """Whether the KL can skip rebuilding the reference logits (a plain float32 head)."""
        return self.expected_embedding is not None

    def rows(self, span: slice) -> "Targets":
        """The targets of scored positions ``span`` (window order): a run of whole windows' positions."""
        pick = lambda t: None if t is None else t[span]  # noqa: E731
        return Targets(self.hidden[span], pick(self.neg_entropy), pick(self.expected_embedding), pick(self.argmax))


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
    token_nll: torch.Tensor | None = None  # (S,) float64 NLL of each scored position, window order
    token_kl: torch.Tensor | None = None  # (S,) float64 KL of each scored position, window order

    def token_positions(self, windows: Windows) -> tuple[torch.Tensor, torch.Tensor]:
        """(window, position) of each scored token, in the order of ``token_nll`` (position of the target)."""
        win, pos = windows.scored[:, 1:].nonzero(as_tuple=True)  # (S,) each
        return win, pos + 1

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
            out["top1_per_window"] = [int(x) for x in self.top1]
            out["kl_percentiles"] = kl_percentiles(self.token_kl)
        return out


KL_QUANTILES = {"p90": 0.9, "p99": 0.99, "p99.9": 0.999, "max": 1.0}


def kl_percentiles(token_kl: torch.Tensor | None) -> dict[str, float] | None:
    """Per-token KL(reference || candidate) at p90, p99, p99.9 and max over all scored tokens (nats;
    linear interpolation between order statistics, as ``numpy.quantile``), as llama.cpp's KL report."""
    if token_kl is None or len(token_kl) == 0:
        return None
    import numpy as np

    q = np.quantile(token_kl.double().numpy(), list(KL_QUANTILES.values()))
    return {name: float(v) for name, v in zip(KL_QUANTILES, q)}


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

    def plain_weight(self) -> torch.Tensor | None:
        """The head's weight when its logits are ``W h`` in float32 (no bias, no soft-capping), else None."""
        weight = getattr(self.head, "weight", None)
        if weight is None:
            return None
        plain = weight.dtype == torch.float32 and getattr(self.head, "bias", None) is None and not self.softcap
        return weight if plain and type(self.head) is torch.nn.Linear else None

    def shared_with(self, model: Any) -> bool:
        """Whether ``model``'s output head computes exactly the reference's plain float32 logits."""
        mine, theirs = self.plain_weight(), ReferenceHead.of(model).plain_weight()
        return mine is not None and theirs is not None and (theirs is mine or torch.equal(theirs, mine))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The reference's float32 logits (S, V) from its head inputs."""
        weight = self.head.weight
        logits = self.head(hidden.to(device=weight.device, dtype=weight.dtype)).float()  # (S, V)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


SCORE_ELEMENTS = 1 << 26  # (positions x vocab) scored per step: ~256 MiB of float32 temporaries, 1,365 rows
# of a 49k vocabulary (the reference's summary GEMM runs 10-20% faster than at 341 rows)


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

    def __init__(self, n: int, reference: Targets | None, head: ReferenceHead | None, keep: bool,
                 own: torch.Tensor | None, paired: bool = False, owned: bool = False):
        self.nll = torch.zeros(n, dtype=torch.float64)
        compared = reference is not None or paired  # paired: the reference's logits come with each batch
        self.kl = torch.zeros(n, dtype=torch.float64) if compared else None
        self.top1 = torch.zeros(n, dtype=torch.long) if compared else None
        self.reference, self.head = reference, head
        self.keep = keep  # the reference pass: keep what the candidate passes need (``Targets``)
        self.own = own  # the reference pass's head weight when plain float32: summarise for the KL
        self.owned = owned  # the logits are this pass's own (its forward's): the normaliser may overwrite them
        self.cursor = 0  # scored positions consumed so far (window order)
        self.tokens: dict[str, list[torch.Tensor]] = {"nll": [], "kl": []}  # per scored position, window order
        self.kept: dict[str, list[torch.Tensor]] = {"hidden": [], "neg_entropy": [],
                                                    "expected_embedding": [], "argmax": []}

    def add(self, first: int, logits: torch.Tensor, windows: Windows, hidden: torch.Tensor | None,
            reference_logits: torch.Tensor | None = None) -> None:
        """``reference_logits`` (S, V): the reference's logits at this batch's scored positions, in order."""
        mask = windows.scored[:, 1:].to(logits.device)  # (B, T-1) targets scored
        b, t = mask.nonzero(as_tuple=True)  # (S,) each, window order
        where = b.cpu() + first  # window index of each scored position
        target = windows.input_ids[:, 1:].to(logits.device)[b, t]  # (S,)
        flat, rows, h = _scored_rows(logits, hidden, mask, b, t)
        if self.keep:
            self.kept["hidden"].append(h.cpu())
            self.head_input = (self.cursor, h)  # the summary's e . h at positions cursor..
        summary = h is not None and self.reference is not None and _is_head_output(flat[rows[:2]], h[:2], self.head)
        h = h if summary else None  # else the KL rebuilds the reference logits (or there is no KL)
        for part in steps(len(rows), max(128, SCORE_ELEMENTS // flat.shape[1])):
            self._score(pick_rows(flat, rows[part]), target[part], where[part], self.cursor + part.start,
                        h[part] if h is not None else None,
                        None if reference_logits is None else reference_logits[part])
        self.cursor += len(rows)

    def _score(self, logits: torch.Tensor, target: torch.Tensor, where: torch.Tensor, start: int,
               h: torch.Tensor | None, given: torch.Tensor | None = None) -> None:
        """NLL (and KL, top-1 vs the reference) of ``logits`` (c, V), positions ``start..start+c``."""
        z = logits.float()
        picked = z.gather(1, target[:, None])[:, 0].double()  # (c,) the targets' logits, before z is overwritten
        spent = self.owned and given is None and (self.reference is None or h is not None)  # z not read again
        norm, top = normaliser(z, spent) if self.own is None else self._summarise(z, start, spent)
        nll = (norm.double() - picked).cpu()  # (c,)
        self.tokens["nll"].append(nll)
        self.nll.index_add_(0, where, nll)
        if self.reference is None and given is None:
            return
        span = slice(start, start + len(target))
        if given is not None:
            ref_top, kl = self._given_kl(z, norm, given)
        else:
            ref_top, kl = self._summary_kl(norm, h, span) if h is not None else self._rebuilt_kl(z, norm, span)
        self.top1.index_add_(0, where, (ref_top.to(top.device) == top).long().cpu())
        self.tokens["kl"].append(kl.double().cpu())
        self.kl.index_add_(0, where, self.tokens["kl"][-1])

    def _summarise(self, z: torch.Tensor, start: int, spent: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's side of the KL at positions ``start..``, from the normaliser's own terms (one
        ``exp``, no float64 (c, V) tensor): ``u = exp(z - max z)``, ``s = sum u``, ``e = E_p[W_v] = (u @ W) / s``
        (float32 GEMMs over blocks of ``EXPECTED_BLOCK`` rows summed in float64, kept as float32) and
        ``sum_v p_v z_v - L`` as ``e . h - L`` (float64, ``h`` the head input, ``L`` the float32 normaliser).
        The candidate's KL ``e . h - L - e . h' + L'`` then carries the error of ``e`` only times ``h - h'``.
        ``spent``: ``z`` is not read again, so ``u`` is built in its place.
        -> (log-normaliser, argmax), the same values as ``normaliser(z)``."""
        top_value, top = z.max(1)
        unnormalised = _shifted(z, top_value, spent).exp_()  # u (c, V)
        total = unnormalised.sum(1)  # s, the normaliser's cascaded float32 sum
        norm = top_value + total.log()
        expected = (expected_rows(unnormalised, self.own) / total.double()[:, None]).float()  # (c, H)
        first, h = self.head_input
        h = h[start - first:start - first + len(z)].to(expected.device)
        self.kept["neg_entropy"].append(((expected.double() * h.double()).sum(1) - norm.double()).cpu())
        self.kept["expected_embedding"].append(expected.cpu())
        self.kept["argmax"].append(top.cpu())
        return norm, top

    def _summary_kl(self, norm: torch.Tensor, h: torch.Tensor, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference argmax, KL) from the reference summary: sum p log p - e . h' + L' (float64)."""
        ref = self.reference
        e = ref.expected_embedding[span].to(h.device).double()
        kl = ref.neg_entropy[span].to(h.device) - (e * h.double()).sum(1) + norm.double()
        same = (h == ref.hidden[span].to(h.device)).all(1)  # identical head input: identical distribution
        return ref.argmax[span], kl.masked_fill_(same, 0.0).clamp_(min=0.0)

    def _rebuilt_kl(self, z: torch.Tensor, norm: torch.Tensor, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference argmax, KL) with the reference logits rebuilt from its head inputs (any head)."""
        return self._given_kl(z, norm, self.head.logits(self.reference.hidden[span]))

    def _given_kl(self, z: torch.Tensor, norm: torch.Tensor, given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference argmax, KL) from the reference's float32 logits ``given`` (c, V) at the same positions."""
        zp = given.to(device=z.device, dtype=torch.float32, copy=True)
        norm_p, ref_top = normaliser(zp)
        logp, logq = zp.sub_(norm_p[:, None]), z - norm[:, None]
        return ref_top, torch.nn.functional.kl_div(logq, logp, reduction="none", log_target=True).sum(1)

    def token(self, name: str) -> torch.Tensor | None:
        parts = self.tokens[name]
        return torch.cat(parts) if parts else None

    def targets(self) -> Targets | None:
        kept = {name: torch.cat(parts) for name, parts in self.kept.items() if parts}
        return Targets(**kept) if "hidden" in kept else None


def steps(n: int, step: int) -> list[slice]:
    """Slices of ``step`` rows over ``n``, none of one row: a one-row matrix product takes a vector kernel whose
    last bits differ, so a lone last row joins the step before (the numbers never depend on the step)."""
    cuts = list(range(0, n, step)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
        cuts[-2] -= 1
    return [slice(lo, hi) for lo, hi in zip(cuts, cuts[1:])]


def normaliser(z: torch.Tensor, spent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-normaliser ``L = logsumexp(z)``, argmax) per row of float32 logits ``z`` (c, V).  ``L`` is
    ``max + log sum exp(z - max)`` with torch's cascaded sum: unbiased to ~1e-7 relative, where
    ``log_softmax``'s running float32 sum drifts ~2e-5 nats low over a 262k vocabulary.  ``spent``: the
    caller never reads ``z`` again, so it is overwritten (half the time: no (c, V) allocation; same values)."""
    top_value, top = z.max(1)
    return top_value + _shifted(z, top_value, spent).exp_().sum(1).log_(), top


def _shifted(z: torch.Tensor, top_value: torch.Tensor, spent: bool) -> torch.Tensor:
    """``z - max`` per row: in ``z``'s own storage when ``spent``, else a new tensor."""
    return z.sub_(top_value[:, None]) if spent else z - top_value[:, None]


EXPECTED_BLOCK = 4096  # vocabulary rows per float32 GEMM in expected_rows; the blocks add in float64


def expected_rows(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``p @ weight`` (c, V) x (V, H) as float64: float32 GEMMs over blocks of the vocabulary, summed in
    float64 (measured on gemma3, 262k rows: one float32 GEMM moved a window's KL by 6e-4 relative; blocked,
    the KL is within 1e-5 of the rebuilt-logits KL)."""
    out = torch.zeros(p.shape[0], weight.shape[1], dtype=torch.float64, device=p.device)
    for lo in range(0, weight.shape[0], EXPECTED_BLOCK):
        out += (p[:, lo:lo + EXPECTED_BLOCK] @ weight[lo:lo + EXPECTED_BLOCK]).double()
    return out


def _scored_rows(logits: torch.Tensor, hidden: torch.Tensor | None, mask: torch.Tensor, b: torch.Tensor,
                 t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logits as rows, the row of each scored position, the float32 head inputs (S, H) or None).  ``logits`` are
    either the whole batch's (B, T, V) or only the scored positions' (S, V), in window order (``scored_logits``);
    ``hidden`` is the head's input, of the same layout (a cached prefix's is not: None then)."""
    if logits.dim() == 2:  # the head ran on the scored positions only
        aligned = hidden is not None and hidden.shape[0] == logits.shape[0]
        return logits, torch.arange(len(b), device=logits.device), hidden.float() if aligned else None
    aligned = hidden is not None and hidden.shape[:2] == logits.shape[:2]
    h = hidden[:, :mask.shape[1]][mask].float() if aligned else None  # a fed last position predicts nothing
    return logits.reshape(-1, logits.shape[-1]), b * logits.shape[1] + t, h


def scored_logits(model: Any, windows: Windows) -> torch.Tensor | None:
    """``logits_to_keep`` for a forward of ``windows`` (B, T) fed its first ``width = windows.fed_width`` tokens that
    computes the output head only where a target is scored (position t predicts t+1; T-1 never does): a (B, width)
    bool mask, which transformers' shared ``slice_logits_to_keep`` applies before the head, so logits come as
    (S, V) in window order.  None (the whole (B, width, V)) where the model's forward does not slice that way, or
    something hooks the model's output (a mitigation that feeds a cached prefix and joins its logits), or no
    position would be kept."""
    forward = inspect.unwrap(getattr(type(model), "forward", None) or (lambda: None))  # past its decorators
    if "slice_logits_to_keep" not in getattr(getattr(forward, "__code__", None), "co_names", ()) \
            or getattr(model, "_forward_hooks", None):
        return None
    keep = torch.nn.functional.pad(windows.scored[:, 1:], (0, 1))[:, :windows.fed_width]  # (B, width)
    return keep if int(keep.sum()) >= 2 else None  # 2+ rows: a one-row product takes another kernel


def _is_head_output(logits: torch.Tensor, h: torch.Tensor, head: ReferenceHead) -> bool:
    """Spot check, once per batch, that ``logits`` (a few rows) are the reference head applied to ``h``:
    a hook or wrapper that changes the head's input or output sends the KL the rebuilding way."""
    return torch.allclose(head.logits(h).to(logits.device), logits.float(), rtol=1e-4, atol=1e-4)


class _HeadInput:
    """Captures the input of the output head during a forward (attached while the pass runs)."""

    def __init__(self, model: Any, active: bool):
        self.model, self.active = model, active
        self.value: torch.Tensor | None = None

    def attached(self) -> ContextManager[Any]:
        from quantsink.hooks.sites import Hook, attach

        if not self.active:
            return nullcontext()
        head = self.model.get_output_embeddings()
        return attach(self.model, {"head": Hook(self._grab, "input")}, known={"head": head})

    def _grab(self, x: torch.Tensor) -> None:
        self.value = x


def batches(windows: Windows, batch_tokens: int, boundaries: tuple[int, ...] = ()) -> list[slice]:
    """Row slices of about ``batch_tokens`` tokens that never straddle a boundary row and hold rows of one width
    only (``row_widths``).  A row padded to a longer neighbour's width gets other bits (the attention kernel
    reduces over the batch's width: up to 2e-5 nats a token), so rows of one width keep every number the same
    whatever ``--batch-tokens``.  Rows come longest first (lm-eval's protocol) or all of one width."""
    widths = row_widths(windows)
    changes = [i for i in range(1, len(windows)) if widths[i] != widths[i - 1]]
    cuts = sorted({0, len(windows), *changes, *(b for b in boundaries if 0 < b < len(windows))})
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        per = max(1, batch_tokens // max(1, widths[lo]))
        out.extend(slice(s, min(s + per, hi)) for s in range(lo, hi, per))
    return out


def row_widths(windows: Windows) -> list[int]:
    """Each row's width without its right padding: its last attended position + 1 (0 for an empty row)."""
    mask = windows.attention_mask.bool()
    last = mask.shape[1] - mask.flip(1).int().argmax(1)
    return torch.where(mask.any(1), last, 0).tolist()


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
    own = ReferenceHead.of(model).plain_weight() if keep_targets else None
    summary_kl = reference is not None and reference.summarised and reference_head.shared_with(model)
    acc = _Accumulator(len(windows), reference, reference_head, keep_targets, own, owned=True)
    start = time.perf_counter()
    head_input = _HeadInput(model, keep_targets or summary_kl)
    with fast_linear(), kept_pages(give_back=False), head_input.attached():
        for rows in batches(windows, batch_tokens, boundaries):
            part = windows.subset(rows).trimmed()  # right padding all rows share is not computed
            ids, mask = part.model_input()
            with batch_context(rows, part) if batch_context else nullcontext():
                keep = scored_logits(model, part)
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            use_cache=False, **({} if keep is None else {"logits_to_keep": keep.to(device)}))
            acc.add(rows.start, out.logits, part, head_input.value)
            head_input.value = None
            del out
            if progress:
                progress(rows.stop - rows.start)
    n_scored = windows.scored[:, 1:].sum(1)
    return PassResult(acc.nll, n_scored, windows.nbytes, acc.kl, acc.top1, acc.targets(),
                      seconds=time.perf_counter() - start, token_nll=acc.token("nll"), token_kl=acc.token("kl"))


class LogitScorer:
    """The evaluator for logits computed elsewhere (another engine, ``quantsink.engines``): the same accumulator
    as ``run_pass``, fed one window at a time.

    Protocol: ``add(i, logits, reference=...)`` takes window ``i``'s logits ``(T_i, V)`` for its first ``T_i``
    ids (``window_ids``), row ``t`` predicting token ``t+1``; NLL over the scored targets as in ``run_pass``.
    ``reference`` is either ``Targets`` with its ``ReferenceHead`` (KL against a transformers reference pass,
    its logits rebuilt) or, per window, the reference engine's own logits ``(T'_i, V)`` over *its* windows
    ``reference_windows`` (paired by scored position, so a candidate with a prepended sink token pairs with
    the reference's plain window): exact KL(reference || candidate) over the full vocabulary and top-1.
    """

    def __init__(self, windows: Windows, *, targets: Targets | None = None, head: ReferenceHead | None = None,
                 reference_windows: Windows | None = None):
        self.windows, self.reference_windows = windows, reference_windows
        self.acc = _Accumulator(len(windows), targets, head, False, None, paired=reference_windows is not None)
        self.start = time.perf_counter()

    def add(self, i: int, logits: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        part = self.windows.subset(slice(i, i + 1))
        given = None
        if reference is not None:
            ref = self.reference_windows.subset(slice(i, i + 1))
            mask = ref.scored[0, 1:len(reference) + 1]  # targets 1.. scored (padding never is)
            given = reference[:len(mask)][mask]  # (S_i, V): row t predicts target t+1
        self.acc.add(i, _padded(logits, part.input_ids.shape[1])[None], part, None, given)

    def result(self) -> PassResult:
        windows = self.windows
        return PassResult(self.acc.nll, windows.scored[:, 1:].sum(1), windows.nbytes, self.acc.kl, self.acc.top1,
                          seconds=time.perf_counter() - self.start, token_nll=self.acc.token("nll"),
                          token_kl=self.acc.token("kl"))


def window_ids(windows: Windows) -> list[list[int]]:
    """Each window's token ids without its right padding (nor its last, unless ``feeds_last``): what another engine
    decodes (no BOS added there)."""
    return [row[:int(n)].tolist() for row, n in zip(windows.input_ids, windows.fed_lengths)]


def _padded(logits: torch.Tensor, width: int) -> torch.Tensor:
    """``logits`` (T, V) with zero rows up to ``width`` (padding positions are never scored)."""
    if logits.shape[0] >= width:
        return logits[:width]
    return torch.cat([logits, logits.new_zeros(width - logits.shape[0], logits.shape[1])])


def score_logits(logits: Any, windows: Windows, *, reference: Any = None,
                 reference_windows: Windows | None = None) -> PassResult:
    """Score one logits tensor per window (an iterable, see ``LogitScorer``), against the reference engine's
    logits per window when ``reference`` is given (an iterable in the same order)."""
    scorer = LogitScorer(windows, reference_windows=(reference_windows or windows) if reference is not None else None)
    refs = iter(reference) if reference is not None else None
    for i, z in enumerate(logits):
        scorer.add(i, z, next(refs) if refs is not None else None)
    return scorer.result()
