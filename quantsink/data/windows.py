"""Every window protocol in one place: a corpus's token stream -> the windows a pass scores.

* ``windows`` (the default): ``--window`` tokens every ``--stride`` over the documents joined in
  corpus order (``sliding_windows``); each token scored once, by the first window that reaches it.
* ``lm-eval``: lm-eval's ``loglikelihood_rolling`` windows, per document (``rolling_windows``), as
  ``HFLM`` builds them, so quantsink's bits per byte equal lm-eval's.

A protocol also gives the calibration windows (tokens after the evaluation ones) and the fields its
record states (window, stride, BOS policy, scored tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from quantsink.config import RunConfig
from quantsink.data.corpus import Corpus, TokenStream, encode, tokenize
from quantsink.errors import QuantsinkError
from quantsink.registry import Registry


@dataclass
class Windows:
    """A batchable set of windows.

    ``input_ids`` (N, T); ``attention_mask`` (N, T); ``scored`` (N, T) is True
    at position t when the model's prediction from positions < t of token t
    counts; ``nbytes`` (N,) bytes of the scored tokens; ``sink_positions`` are
    prepended, never-scored positions (BOS or a dedicated sink token).
    """

    input_ids: Any
    attention_mask: Any
    scored: Any
    nbytes: Any
    sink_positions: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def subset(self, rows: slice) -> "Windows":
        return Windows(self.input_ids[rows], self.attention_mask[rows], self.scored[rows],
                       self.nbytes[rows], self.sink_positions)

    def trimmed(self) -> "Windows":
        """Drop trailing columns that are padding in every row (right-padded windows)."""
        width = int(self.attention_mask.any(0).nonzero().max()) + 1 if self.attention_mask.any() else 1
        if width == self.input_ids.shape[1]:
            return self
        return Windows(self.input_ids[:, :width], self.attention_mask[:, :width], self.scored[:, :width],
                       self.nbytes, self.sink_positions)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of full windows over a stream of ``length`` tokens."""
    if length < window:
        return []
    return list(range(0, length - window + 1, stride))


def sliding_windows(stream: TokenStream, *, window: int, stride: int, prefix: int | None,
                    max_tokens: int) -> tuple[Windows, int]:
    """Cut the first ``max_tokens`` tokens of ``stream`` into windows.

    Worked example, window=4, stride=4, no prefix, tokens t0..t9, max_tokens=10:
    windows [t0 t1 t2 t3] [t4 t5 t6 t7]; scored targets t1 t2 t3 | t5 t6 t7
    (the first token of a window has no context and is not scored; t8 t9 do
    not fill a window and are dropped).  With ``prefix`` (BOS) each window is
    [BOS t0 t1 t2 t3] and every content token is scored.  With stride=2 (< window)
    windows start at 0, 2, 4, 6 and each later window scores only the targets the
    previous one did not reach ([t4 t5] for the second), so every scored token is
    scored exactly once, with at least window - stride tokens of context.
    Returns the windows and the number of stream tokens they consumed.
    """
    import torch

    usable = min(len(stream), max_tokens)
    starts = window_starts(usable, window, stride)
    if not starts:
        raise QuantsinkError(f"text shorter than a window: {usable} tokens < --window {window}; "
                             f"lower --window or raise --max-tokens / use a longer corpus")
    lead = 0 if prefix is None else 1
    ids = torch.tensor([stream.ids[s:s + window] for s in starts], dtype=torch.long)  # (N, W)
    nb = torch.tensor([stream.nbytes[s:s + window] for s in starts], dtype=torch.long)  # (N, W)
    scored = torch.ones_like(ids, dtype=torch.bool)  # (N, W)
    for row, start in enumerate(starts[1:], 1):
        scored[row, :starts[row - 1] + window - start] = False  # the previous window scored these
    if prefix is None:
        scored[:, 0] = False  # no context to predict a window's first token from
    if lead:
        ids = torch.cat([torch.full((len(starts), 1), prefix, dtype=torch.long), ids], 1)  # (N, W+1)
        scored = torch.cat([torch.zeros(len(starts), 1, dtype=torch.bool), scored], 1)
        nb = torch.cat([torch.zeros(len(starts), 1, dtype=torch.long), nb], 1)
    windows = Windows(ids, torch.ones_like(ids), scored, (nb * scored).sum(1),
                      sink_positions=(0,) if lead else ())
    return windows, starts[-1] + window


def rolling_rows(n: int, length: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows over ``S = [prefix] + doc`` (``n`` document tokens) as
    ``(start, stop, first_scored)`` slices of S; see ``rolling_windows``."""
    rows = [(0, min(length, n) + 1, 1)]
    done = rows[0][1] - 1  # document tokens predicted so far
    while done < n:
        step = min(n - done, length)
        stop = done + step + 1  # S index one past the last target
        rows.append((stop - length - 1, stop, length + 1 - step))
        done += step
    return rows


def rolling_windows(documents: list[TokenStream], *, length: int, prefix: int, pad: int = 0) -> Windows:
    """lm-eval's ``loglikelihood_rolling`` windows, one document at a time.

    Reproduces ``HFLM.loglikelihood_rolling``: ``get_rolling_token_windows(tokens,
    prefix_token, max_seq_len=length, context_len=1)`` made disjoint by
    ``make_disjoint_window``.  The prefix (EOT/BOS) precedes only a document's first
    window; every document token is scored exactly once; no context crosses documents.
    Rows hold ``length + 1`` tokens (the model sees ``length`` inputs; the last token is
    only a target, its own logits are unused).

    Worked example, length=4, prefix P, document d0..d9 (S = P d0 .. d9):
    ``[P d0 d1 d2 d3]`` scores d0..d3; ``[d3 d4 d5 d6 d7]`` scores d4..d7; the last
    window is right-aligned with full context, ``[d5 d6 d7 d8 d9]``, and scores only
    d8 d9.  A document shorter than ``length``, e.g. e0 e1, gives ``[P e0 e1]`` scoring
    e0 e1, right-padded with ``pad`` (attention_mask 0, never scored).  Rows are ordered
    longest first (stable), as lm-eval's collator orders them, so padded rows batch together.
    """
    import torch

    rows = []  # (ids, nbytes, first scored index)
    for doc in documents:
        ids, nbytes = [prefix, *doc.ids], [0, *doc.nbytes]
        for start, stop, first in rolling_rows(len(doc), length):
            rows.append((ids[start:stop], nbytes[start:stop], first))
    if not rows:
        raise QuantsinkError("no document has any tokens to score; use a non-empty corpus")
    rows.sort(key=lambda row: -len(row[0]))
    width = length + 1
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (N, L+1)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, L+1)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)  # (N, L+1)
    nbytes = torch.zeros(len(rows), dtype=torch.long)  # (N,)
    for i, (ids, nb, first) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        scored[i, first:len(ids)] = True
        nbytes[i] = sum(nb[first:])
    return Windows(input_ids, attention_mask, scored, nbytes)


PROTOCOL = ("lm-eval loglikelihood_rolling (HFLM): each document tokenized alone (tokenizer defaults), "
            "disjoint windows of max_length tokens, the prefix token (BOS, else EOS) before the first "
            "window only, every token scored once; word_perplexity = exp(-sum ll / whitespace words), "
            "byte_perplexity = exp(-sum ll / UTF-8 bytes), bits_per_byte = -sum ll / ln 2 / UTF-8 bytes")


def prefix_token(tokenizer: Any) -> int:
    """HFLM.prefix_token_id: BOS when the tokenizer has one, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise QuantsinkError("lm-eval's protocol needs a BOS or EOS token and this tokenizer has neither")
    return int(token)


def encode_documents(texts: Sequence[str], tokenizer: Any) -> list[TokenStream]:
    """Each document tokenized as ``HFLM.tok_encode`` does: tokenizer default special
    tokens, except none when the text already starts with the prefix token's string."""
    prefix = tokenizer.decode(prefix_token(tokenizer))
    return [encode(t, tokenizer, special_tokens=not t.startswith(prefix)) for t in texts]


def document_windows(texts: Sequence[str], tokenizer: Any, length: int) -> Windows:
    """lm-eval's rolling windows over ``texts`` (see ``windows.rolling_windows``)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token(tokenizer)
    return rolling_windows(encode_documents(texts, tokenizer), length=length, prefix=prefix_token(tokenizer),
                           pad=pad)


def bos_token(tokenizer: Any, policy: str) -> int | None:
    """The token id to prepend to each window, or None (``auto``: the tokenizer's default)."""
    bos = tokenizer.bos_token_id
    if policy == "never":
        return None
    if policy == "always":
        if bos is None:
            raise QuantsinkError("--bos always: this tokenizer has no BOS token; use --bos never")
        return bos
    first = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and first and first[0] == bos else None


@dataclass
class Windowing:
    """What a protocol makes of a corpus: evaluation windows, lazy calibration windows,
    and the protocol's own record fields."""

    windows: Windows
    calibration: Callable[[], Windows]
    protocol: dict[str, Any]


PROTOCOLS: Registry[Callable[[RunConfig, Corpus, Any], Windowing]] = Registry("protocol")


def _calibration(config: RunConfig, stream: TokenStream, prefix: int | None) -> Callable[[], Windows]:
    """Calibration windows from ``stream`` (the tokens after the evaluation ones), built on demand."""
    def calibration() -> Windows:
        if len(stream) < config.window:
            raise QuantsinkError("no tokens left for calibration after the evaluation tokens: "
                                 "lower --max-tokens or use a longer corpus")
        calib, _ = sliding_windows(stream, window=config.window, stride=config.window, prefix=prefix,
                                   max_tokens=config.calib_windows * config.window)
        return calib

    return calibration


@PROTOCOLS.register("windows", help="fixed windows over the joined corpus")
def fixed_windows(config: RunConfig, corpus: Corpus, tokenizer: Any) -> Windowing:
    """``--window`` tokens every ``--stride`` over the documents joined in order (``sliding_windows``)."""
    prefix = bos_token(tokenizer, config.bos)
    stride = config.effective_stride
    stream = tokenize(corpus, tokenizer, limit=config.max_tokens + config.calib_windows * config.window)
    windows, used = sliding_windows(stream, window=config.window, stride=stride, prefix=prefix,
                                    max_tokens=config.max_tokens)
    rest = TokenStream(stream.ids[used:], stream.nbytes[used:])
    protocol = {
        "window": config.window, "stride": stride, "bos": config.bos, "bos_token_id": prefix, "tokens": used,
        "scoring": ("each token scored once, by the first window that reaches it; a window's "
                    "first token is scored only when a BOS precedes it; BOS never scored"),
    }
    return Windowing(windows, _calibration(config, rest, prefix), protocol)


@PROTOCOLS.register("lm-eval", help="lm-eval's loglikelihood_rolling windows, per document")
def lm_eval_windows(config: RunConfig, corpus: Corpus, tokenizer: Any) -> Windowing:
    """lm-eval's rolling windows (``windows.rolling_windows``) over whole documents in corpus
    order, up to the first document that reaches ``--max-tokens``."""
    docs, tokens = [], 0
    for text in corpus.documents:
        if tokens >= config.max_tokens:
            break
        docs.append(text)
        tokens += len(encode_documents([text], tokenizer)[0])
    windows = document_windows(docs, tokenizer, config.window)
    prefix = prefix_token(tokenizer)
    rest = corpus.documents[len(docs):]
    stream = tokenize(Corpus.of(corpus.name, list(rest)), tokenizer,
                      limit=config.calib_windows * config.window) if rest else TokenStream([], [])
    protocol = {
        "window": config.window, "stride": config.window, "bos": "lm-eval", "bos_token_id": prefix,
        "tokens": tokens, "n_documents": len(docs),
        "scoring": PROTOCOL + "; the model sees window+1 tokens per row, the last only as a target; "
                   "rows longest first, right-padded (attention_mask 0, never scored)",
    }
    return Windowing(windows, _calibration(config, stream, prefix), protocol)
