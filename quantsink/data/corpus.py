"""Corpora -> deterministic token windows.

Embedded, offline corpora (the paper's Wikipedia/GitHub split in small):

* ``python-docs``: English prose, the documentation topics bundled with CPython
  (``pydoc_data.topics``), in sorted topic order.
* ``python-code``: a fixed, sorted list of standard-library sources.

Plus ``file:PATH`` (.txt, or .jsonl with a ``text`` field) and ``wikitext2``
through ``datasets`` (needs the hub).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantsink.errors import QuantsinkError
from quantsink.registry import Registry

SEPARATOR = "\n\n"  # between documents of one corpus

# Sorted; every file exists in CPython >= 3.11.  The corpus hash in each record
# pins the exact text (it changes with the Python version).
PYTHON_CODE_FILES = (
    "argparse.py", "bisect.py", "calendar.py", "colorsys.py", "csv.py",
    "dataclasses.py", "difflib.py", "fractions.py", "functools.py", "heapq.py",
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "shlex.py",
    "statistics.py", "string.py", "textwrap.py",
)


@dataclass(frozen=True)
class Corpus:
    """A named list of documents and the sha256 of their joined text."""

    name: str
    documents: tuple[str, ...]
    sha256: str

    @classmethod
    def of(cls, name: str, documents: list[str]) -> "Corpus":
        docs = tuple(d for d in documents if d.strip())
        if not docs:
            raise QuantsinkError(f"corpus {name!r} is empty: give it at least one non-blank document")
        digest = hashlib.sha256(SEPARATOR.join(docs).encode("utf-8")).hexdigest()
        return cls(name, docs, digest)

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents) + len(SEPARATOR) * (len(self.documents) - 1)


CORPORA: Registry[Callable[[str, bool], Corpus]] = Registry("corpus")  # (name, offline) -> Corpus


@CORPORA.register("python-docs", help="English prose: CPython's bundled documentation topics (offline)",
                  aliases=("docs",))
def _python_docs(name: str, offline: bool) -> Corpus:
    from pydoc_data.topics import topics

    return Corpus.of(name, [topics[key] for key in sorted(topics)])


@CORPORA.register("python-code", help="Python source: a fixed, sorted list of stdlib files (offline)",
                  aliases=("code",))
def _python_code(name: str, offline: bool) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    return Corpus.of(name, [(root / rel).read_text(encoding="utf-8") for rel in PYTHON_CODE_FILES])


@CORPORA.register("wikitext2", help="WikiText-2 raw test split via `datasets` (needs the hub)")
def _wikitext2(name: str, offline: bool) -> Corpus:
    """From the hub, or offline from the local ``datasets`` cache only."""
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test",
                                     download_config=datasets.DownloadConfig(local_files_only=offline))
    except Exception as err:  # noqa: BLE001 - any hub failure means the same to the user
        where = "offline mode is on (--offline or HF_HUB_OFFLINE=1) and it is not cached" if offline else \
            f"the Hugging Face hub is unreachable ({type(err).__name__})"
        raise QuantsinkError(f"corpus 'wikitext2' needs the Hugging Face hub and {where}; use an offline "
                             f"corpus: python-docs, python-code or file:PATH") from None
    return Corpus.of(name, ["".join(rows["text"])])


def _read_file(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file one document per line's ``text`` string.
    A UTF-8 byte-order mark at the start is not text and is dropped."""
    if path.is_dir():
        raise QuantsinkError(f"corpus file {str(path)!r} is a directory: give file:PATH to a .txt or .jsonl file")
    if not path.is_file():
        raise QuantsinkError(f"corpus file {str(path)!r} does not exist: give file:PATH to a .txt or .jsonl file")
    text = path.read_text(encoding="utf-8-sig", errors="strict")
    if path.suffix != ".jsonl":
        return [text]
    return [_jsonl_text(line, f"{path}:{lineno}") for lineno, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _jsonl_text(line: str, where: str) -> str:
    """The ``text`` string of one .jsonl line."""
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise QuantsinkError(f"{where}: not a JSON object with a 'text' field; "
                             f"fix the line or pass a .txt file") from None
    if not isinstance(text, str):
        raise QuantsinkError(f"{where}: 'text' is {JSON_KINDS.get(type(text), 'not text')}, not a string; "
                             f"fix the line or pass a .txt file")
    return text


JSON_KINDS = {int: "a number", float: "a number", bool: "a boolean", list: "a list", dict: "an object",
              type(None): "null"}


def load_corpus(spec: str, *, offline: bool = False) -> Corpus:
    """A registered corpus name or ``file:PATH`` (``offline``: a hub corpus only from the local cache)."""
    if spec.startswith("file:"):
        path = Path(spec[len("file:"):]).expanduser()
        try:
            return Corpus.of(spec, _read_file(path))
        except UnicodeDecodeError:
            raise QuantsinkError(f"corpus file {str(path)!r} is not UTF-8 text") from None
    entry = CORPORA.entry(spec)
    return entry.obj(entry.name, offline)


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class TokenStream:
    """Token ids of a corpus prefix, and the UTF-8 bytes of text each token accounts for.

    Token i is credited with the bytes from its own start offset to the next
    token's start, so the byte counts partition the text exactly.
    """

    ids: list[int]
    nbytes: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def encode(text: str, tokenizer: Any, *, special_tokens: bool = False) -> TokenStream:
    """One text -> token ids and the UTF-8 bytes each token accounts for.

    Start offsets are made non-decreasing (a special token added by the tokenizer
    reports offset 0), so the byte counts always partition ``text`` exactly.
    """
    enc = tokenizer(text, add_special_tokens=special_tokens, return_offsets_mapping=True)
    starts = list(itertools.accumulate((start for start, _ in enc["offset_mapping"]), max)) + [len(text)]
    if starts:
        starts[0] = 0
    nbytes = [len(text[a:b].encode("utf-8")) for a, b in zip(starts, starts[1:])]
    return TokenStream(list(enc["input_ids"]), nbytes)


def tokenize(corpus: Corpus, tokenizer: Any, limit: int | None = None) -> TokenStream:
    """Tokenize documents in order (joined by ``SEPARATOR``), stopping after ``limit`` tokens."""
    ids: list[int] = []
    nbytes: list[int] = []
    last = len(corpus.documents) - 1
    for i, doc in enumerate(corpus.documents):
        part = encode(doc if i == last else doc + SEPARATOR, tokenizer)
        ids.extend(part.ids)
        nbytes.extend(part.nbytes)
        if limit is not None and len(ids) >= limit:
            return TokenStream(ids[:limit], nbytes[:limit])
    return TokenStream(ids, nbytes)


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
