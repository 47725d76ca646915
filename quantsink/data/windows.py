"""Every window protocol in one place: a corpus's token stream -> the windows a pass scores.

* ``documents`` (the default): disjoint windows drawn round-robin over the documents in a seeded
  order (``corpus_windows``), so N windows come from up to N documents; calibration windows from
  other documents; each window's document is recorded, so intervals can be clustered by document.
* ``windows`` (the default of schema 2, kept to reproduce its records): ``--window`` tokens every
  ``--stride`` over the documents joined in corpus order (``sliding_windows``); each token scored
  once, by the first window that reaches it.
* ``lm-eval``: lm-eval's ``loglikelihood_rolling`` windows, per document (``rolling_windows``), as
  ``HFLM`` builds them, so quantsink's bits per byte equal lm-eval's.

A protocol also gives the calibration windows (tokens after the evaluation ones) and the fields its
record states (window, stride, BOS policy, scored tokens).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from quantsink.config import RunConfig
from quantsink.data.corpus import Corpus, TokenStream, encode, tokenize
from quantsink.errors import QuantsinkError, UsageError
from quantsink.registry import Registry


@dataclass
class Windows:
    """A batchable set of windows.

    ``input_ids`` (N, T); ``attention_mask`` (N, T); ``scored`` (N, T) is True
    at position t when the model's prediction from positions < t of token t
    counts; ``nbytes`` (N,) bytes of the scored tokens; ``sink_positions`` are
    prepended, never-scored positions (BOS or a dedicated sink token).  ``feeds_last``: whether the
    model is fed each row's last token, which is a target only (its own prediction is never scored);
    lm-eval's rolling windows are not (``HFLM`` feeds ``tokens[:-1]``), the other protocols are.
    """

    input_ids: Any
    attention_mask: Any
    scored: Any
    nbytes: Any
    sink_positions: tuple[int, ...] = ()
    feeds_last: bool = True

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def unfed(self) -> int:
        """Tokens at the end of each row the model is not fed: 1 where the last is a target only, else 0."""
        return 0 if self.feeds_last else 1

    @property
    def fed_lengths(self) -> Any:
        """(N,) positions each row's forward is fed: its tokens without right padding, less ``unfed``."""
        return (self.attention_mask.sum(1) - self.unfed).clamp(min=0)

    @property
    def fed_width(self) -> int:
        """Positions of the widest forward: the rows' width, less the last token where it is not fed."""
        return int(self.input_ids.shape[1]) - self.unfed

    def subset(self, rows: slice) -> "Windows":
        return Windows(self.input_ids[rows], self.attention_mask[rows], self.scored[rows],
                       self.nbytes[rows], self.sink_positions, self.feeds_last)

    def trimmed(self) -> "Windows":
        """Drop trailing columns that are padding in every row (right-padded windows)."""
        width = int(self.attention_mask.any(0).nonzero().max()) + 1 if self.attention_mask.any() else 1
        if width == self.input_ids.shape[1]:
            return self
        return Windows(self.input_ids[:, :width], self.attention_mask[:, :width], self.scored[:, :width],
                       self.nbytes, self.sink_positions, self.feeds_last)

    def model_input(self) -> tuple[Any, Any]:
        """(input_ids, attention_mask) the model is fed: every column, or, unless ``feeds_last``, all but the
        last, which must then be every row's last token (rows of one width, as ``passes.batches`` gives)."""
        if not self.feeds_last and not bool(self.attention_mask[:, -1].all()):
            raise ValueError("rows that end in a target-only token must share one width to drop it")
        return self.input_ids[:, :self.fed_width], self.attention_mask[:, :self.fed_width]


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
        raise UsageError(f"text shorter than a window: {usable} tokens < --window {window}; "
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
    Rows hold ``length + 1`` tokens; the model is fed all but a row's last, which is only a
    target (``feeds_last=False``), as ``HFLM`` feeds ``tokens[:-1]``.

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
        raise UsageError("no document has any tokens to score; use a non-empty corpus")
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
    return Windows(input_ids, attention_mask, scored, nbytes, feeds_last=False)


PROTOCOL = ("lm-eval loglikelihood_rolling (HFLM): each document tokenized alone (tokenizer defaults), "
            "disjoint windows of max_length tokens, the prefix token (BOS, else EOS) before the first "
            "window only, every token scored once, the model fed each window but its last token (a target "
            "only); word_perplexity = exp(-sum ll / whitespace words), "
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
            raise UsageError("--bos always: this tokenizer has no BOS token; use --bos never")
        return bos
    first = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and first and first[0] == bos else None


@dataclass
class Windowing:
    """What a protocol makes of a corpus: evaluation windows, lazy calibration windows,
    and the protocol's own record fields."""

    windows: Windows
    calibration: Callable[..., Windows]  # (draw: int = 0) -> that calibration draw's windows
    protocol: dict[str, Any]


PROTOCOLS: Registry[Callable[[RunConfig, Corpus, Any], Windowing]] = Registry("protocol")


def _calibration(config: RunConfig, stream: TokenStream, prefix: int | None) -> Callable[..., Windows]:
    """Calibration windows from ``stream`` (the tokens after the evaluation ones), built on demand; draw
    ``d`` starts ``d * calib_windows`` windows in."""
    def calibration(draw: int = 0) -> Windows:
        span = config.calib_windows * config.window
        rest = TokenStream(stream.ids[draw * span:], stream.nbytes[draw * span:])
        if len(rest) < config.window:
            raise UsageError(f"no tokens left for calibration draw {draw + 1} after the evaluation tokens: "
                                 "lower --max-tokens or --calib-draws, or use a longer corpus")
        calib, _ = sliding_windows(rest, window=config.window, stride=config.window, prefix=prefix,
                                   max_tokens=span)
        return calib

    return calibration


@PROTOCOLS.register("windows", help="fixed windows over the joined corpus")
def fixed_windows(config: RunConfig, corpus: Corpus, tokenizer: Any) -> Windowing:
    """``--window`` tokens every ``--stride`` over the documents joined in order (``sliding_windows``)."""
    prefix = bos_token(tokenizer, config.bos)
    stride = config.effective_stride
    stream = tokenize(corpus, tokenizer,
                      limit=config.max_tokens + config.calib_draws * config.calib_windows * config.window)
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
                      limit=config.calib_draws * config.calib_windows * config.window) if rest else TokenStream([], [])
    protocol = {
        "window": config.window, "stride": config.window, "bos": "lm-eval", "bos_token_id": prefix,
        "tokens": tokens, "n_documents": len(docs),
        "scoring": PROTOCOL + "; a row holds window+1 tokens, the model is fed all but the last, as HFLM; "
                   "rows longest first, right-padded (attention_mask 0, never scored); a forward holds rows "
                   "of one width only, so no row is padded where it is computed",
    }
    return Windowing(windows, _calibration(config, stream, prefix), protocol)


CALIBRATION_SHARE = 4  # one eligible document in this many (at least one) is kept for calibration


def document_order(corpus: Corpus, seed: int) -> list[int]:
    """Indices of ``corpus.documents`` shuffled by a seeded hash: ``sha256(seed, sha256(text))``, ascending."""
    def key(i: int) -> str:
        text = hashlib.sha256(corpus.documents[i].encode("utf-8")).hexdigest()
        return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()

    return sorted(range(len(corpus.documents)), key=key)


def round_robin(chunks: dict[int, int], count: int) -> list[tuple[int, int]]:
    """Up to ``count`` (document, chunk) pairs: every document's chunk 0 in ``chunks``' order, then every
    chunk 1, ...; ``chunks`` maps a document to how many whole chunks it holds.  N windows thus come from
    min(N, documents) documents."""
    picked: list[tuple[int, int]] = []
    for k in range(max(chunks.values(), default=0)):
        picked.extend((doc, k) for doc, n in chunks.items() if k < n)
    return picked[:count]


def chunk_windows(streams: dict[int, TokenStream], picks: list[tuple[int, int]], *, window: int,
                  prefix: int | None) -> Windows:
    """One window per (document, chunk): tokens ``chunk*window .. +window`` of that document alone; the
    first token scored only when ``prefix`` (BOS) precedes it."""
    import torch

    ids = torch.tensor([streams[d].ids[k * window:(k + 1) * window] for d, k in picks], dtype=torch.long)
    nb = torch.tensor([streams[d].nbytes[k * window:(k + 1) * window] for d, k in picks], dtype=torch.long)
    scored = torch.ones_like(ids, dtype=torch.bool)  # (N, W)
    if prefix is None:
        scored[:, 0] = False
    else:
        ids = torch.cat([torch.full((len(picks), 1), prefix, dtype=torch.long), ids], 1)  # (N, W+1)
        scored = torch.cat([torch.zeros(len(picks), 1, dtype=torch.bool), scored], 1)
        nb = torch.cat([torch.zeros(len(picks), 1, dtype=torch.long), nb], 1)
    return Windows(ids, torch.ones_like(ids), scored, (nb * scored).sum(1),
                   sink_positions=(0,) if prefix is not None else ())


def split_documents(corpus: Corpus, tokenizer: Any,
                    config: RunConfig) -> tuple[dict[int, TokenStream], dict[int, TokenStream]] | None:
    """(evaluation, calibration) documents with at least one whole window, each tokenized alone, in the
    seeded order; the last ``1/CALIBRATION_SHARE`` of them (at least one) calibrate.  None with fewer
    than two such documents."""
    streams = {i: encode(corpus.documents[i], tokenizer) for i in document_order(corpus, config.seed)}
    eligible = {i: s for i, s in streams.items() if len(s) >= config.window}
    if len(eligible) < 2:
        return None
    keys = list(eligible)
    cut = len(keys) - max(1, len(keys) // CALIBRATION_SHARE)
    return {i: eligible[i] for i in keys[:cut]}, {i: eligible[i] for i in keys[cut:]}


@PROTOCOLS.register("documents", help="windows drawn across the corpus's documents (seeded), the default")
def corpus_windows(config: RunConfig, corpus: Corpus, tokenizer: Any) -> Windowing:
    """``max_tokens // window`` disjoint windows drawn round-robin over the documents in a seeded order
    (``document_order``): one per document first, so N windows come from up to N documents; calibration
    windows from other documents (``split_documents``).  Each window's document index is recorded
    (``window_documents``) so that intervals can be clustered by document."""
    split = split_documents(corpus, tokenizer, config)
    if split is None:
        return single_document(config, corpus, tokenizer)
    prefix = bos_token(tokenizer, config.bos)
    evaluation, calibration = split
    chunks = {i: len(s) // config.window for i, s in evaluation.items()}
    picks = round_robin(chunks, config.max_tokens // config.window)
    windows = chunk_windows(evaluation, picks, window=config.window, prefix=prefix)
    protocol = {
        "window": config.window, "stride": config.window, "bos": config.bos, "bos_token_id": prefix,
        "tokens": len(picks) * config.window, "documents": len({d for d, _ in picks}),
        "window_documents": [d for d, _ in picks], "calibration_documents": len(calibration), "seed": config.seed,
        "scoring": ("disjoint windows, each within one document (tokenized alone), drawn round-robin over the "
                    "documents in a seeded order; a window's first token is scored only when a BOS precedes it; "
                    "BOS never scored; calibration windows from documents disjoint from these"),
    }
    return Windowing(windows, _document_calibration(config, calibration, prefix), protocol)


def single_document(config: RunConfig, corpus: Corpus, tokenizer: Any) -> Windowing:
    """Fewer than two documents of a whole window (one .txt file, wikitext2's joined text): the ``windows``
    protocol's consecutive windows, each its own cluster (``window_documents`` not recorded)."""
    made = fixed_windows(config, corpus, tokenizer)
    made.protocol.update(documents=1, scoring="fewer than two documents hold a whole window, so windows are cut "
                         "as --protocol windows cuts them (each its own cluster): " + made.protocol["scoring"])
    return made


def _document_calibration(config: RunConfig, streams: dict[int, TokenStream],
                          prefix: int | None) -> Callable[..., Windows]:
    """Calibration draw ``d``: windows ``d*calib_windows .. +calib_windows`` of the calibration documents'
    round-robin order (draws are disjoint; a draw past the supply is refused)."""
    def calibration(draw: int = 0) -> Windows:
        picks = round_robin({i: len(s) // config.window for i, s in streams.items()},
                            (draw + 1) * config.calib_windows)[draw * config.calib_windows:]
        if not picks:
            raise UsageError(f"calibration draw {draw + 1}: the calibration documents hold too few windows; "
                                 f"lower --calib-windows or use a longer corpus")
        return chunk_windows(streams, picks, window=config.window, prefix=prefix)

    return calibration
