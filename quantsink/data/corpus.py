"""Corpora -> deterministic token windows.

Embedded, offline corpora (the paper's Wikipedia/GitHub split in small):

* ``python-docs``: English prose, the documentation topics bundled with CPython
  (``pydoc_data.topics``), in sorted topic order.
* ``python-code``: a fixed, sorted list of standard-library sources.

Plus ``file:PATH`` (.txt, or .jsonl with a ``text`` field) and ``wikitext2``
through ``datasets`` (needs the hub).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from quantsink.errors import QuantsinkError, UsageError
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
            raise UsageError(f"corpus {name!r} is empty: give it at least one non-blank document")
        digest = hashlib.sha256(SEPARATOR.join(docs).encode("utf-8")).hexdigest()
        return cls(name, docs, digest)

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents) + len(SEPARATOR) * (len(self.documents) - 1)

    @property
    def n_documents(self) -> int:
        return len(self.documents)

    def readers(self) -> Iterator["Reader"]:
        """Each document as a ``Reader`` (its first n characters), in order."""
        return (functools.partial(_head, d) for d in self.documents)


Reader = Callable[[int | None], str]  # n -> a document's first n characters (None: all of it)


def _head(text: str, n: int | None) -> str:
    return text if n is None else text[:n]


@dataclass(frozen=True)
class FileCorpus:
    """A ``file:PATH`` corpus read lazily: hashed in a stream when opened, and read (and tokenized)
    only as far as a run needs (``readers``); ``documents`` reads it all, for protocols that use all."""

    name: str
    path: Path
    sha256: str
    n_documents: int

    @classmethod
    def open(cls, name: str, path: Path) -> "FileCorpus":
        _check_file(path)
        digest, count = _hash_documents(_jsonl_documents(path)) if path.suffix == ".jsonl" else _hash_text(path)
        if not count:
            Corpus.of(name, [])  # the one "corpus is empty" error
        return cls(name, path, digest, count)

    @functools.cached_property
    def documents(self) -> tuple[str, ...]:
        if self.path.suffix == ".jsonl":
            return tuple(_jsonl_documents(self.path))
        return (_file_head(self.path, None),)

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents) + len(SEPARATOR) * (self.n_documents - 1)

    def readers(self) -> Iterator[Reader]:
        if self.path.suffix == ".jsonl":
            return (functools.partial(_head, text) for text in _jsonl_documents(self.path))
        return iter([functools.partial(_file_head, self.path)])


def _check_file(path: Path) -> None:
    """A regular, readable file (a FIFO would block, a symlink loop is no file); one line otherwise."""
    if path.is_symlink() and not path.exists():
        raise UsageError(f"corpus file {str(path)!r} is a broken symlink or a symlink loop: give file:PATH "
                         f"to a .txt or .jsonl file")
    if path.exists() and not path.is_dir() and not path.is_file():
        raise UsageError(f"corpus file {str(path)!r} is not a regular file (a FIFO, socket or device): give "
                         f"file:PATH to a .txt or .jsonl file")
    if path.is_dir() or not path.is_file():
        _read_file(path)  # its one-line error for a directory or a missing file


BLOCK = 1 << 20  # characters hashed at a time


def _hash_text(path: Path) -> tuple[str, int]:
    """sha256 of a .txt file's text (a BOM dropped), read in blocks; and 1 document, or 0 when blank."""
    digest, blank = hashlib.sha256(), True
    with path.open(encoding="utf-8-sig", errors="strict") as handle:
        for block in iter(lambda: handle.read(BLOCK), ""):
            digest.update(block.encode("utf-8"))
            blank = blank and not block.strip()
    return digest.hexdigest(), 0 if blank else 1


def _hash_documents(documents: Iterator[str]) -> tuple[str, int]:
    """sha256 of the documents joined by ``SEPARATOR`` (as ``Corpus.of``), and how many there are."""
    digest, count = hashlib.sha256(), 0
    for text in documents:
        digest.update(((SEPARATOR if count else "") + text).encode("utf-8"))
        count += 1
    return digest.hexdigest(), count


def _file_head(path: Path, n: int | None) -> str:
    with path.open(encoding="utf-8-sig", errors="strict") as handle:
        return handle.read(-1 if n is None else n)


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8-sig", errors="strict") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                text = _jsonl_text(line, f"{path}:{lineno}")
                if text.strip():
                    yield text


CORPORA: Registry[Callable[[str, bool], Corpus]] = Registry("corpus", "corpora")  # (name, offline) -> Corpus


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
        raise UsageError(f"corpus 'wikitext2' needs the Hugging Face hub and {where}; use an offline "
                             f"corpus: python-docs, python-code or file:PATH") from None
    return Corpus.of(name, ["".join(rows["text"])])


def _read_file(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file one document per line's ``text`` string.
    A UTF-8 byte-order mark at the start is not text and is dropped."""
    if path.is_dir():
        raise UsageError(f"corpus file {str(path)!r} is a directory: give file:PATH to a .txt or .jsonl file")
    if not path.is_file():
        raise UsageError(f"corpus file {str(path)!r} does not exist: give file:PATH to a .txt or .jsonl file")
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
        raise UsageError(f"{where}: not a JSON object with a 'text' field; "
                             f"fix the line or pass a .txt file") from None
    if not isinstance(text, str):
        raise UsageError(f"{where}: 'text' is {JSON_KINDS.get(type(text), 'not text')}, not a string; "
                             f"fix the line or pass a .txt file")
    return text


JSON_KINDS = {int: "a number", float: "a number", bool: "a boolean", list: "a list", dict: "an object",
              type(None): "null"}


def load_corpus(spec: str, *, offline: bool = False) -> Corpus:
    """A registered corpus name or ``file:PATH`` (``offline``: a hub corpus only from the local cache)."""
    if spec.startswith("file:"):
        path = Path(spec[len("file:"):]).expanduser()
        try:
            return FileCorpus.open(spec, path)
        except UnicodeDecodeError:
            raise UsageError(f"corpus file {str(path)!r} is not UTF-8 text") from None
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
    """Tokenize documents in order (joined by ``SEPARATOR``), stopping after ``limit`` tokens: documents
    are read, and tokenized, only as far as the ``limit`` needs (``encode_prefix``)."""
    ids: list[int] = []
    nbytes: list[int] = []
    readers = corpus.readers()
    current = next(readers, None)
    while current is not None:
        following = next(readers, None)
        need = None if limit is None else limit - len(ids)
        part = encode_prefix(current, tokenizer, need, SEPARATOR if following is not None else "")
        ids.extend(part.ids)
        nbytes.extend(part.nbytes)
        if limit is not None and len(ids) >= limit:
            return TokenStream(ids[:limit], nbytes[:limit])
        current = following
    return TokenStream(ids, nbytes)


CHARS_PER_TOKEN = 8  # a first read of 8 characters per token needed; four times more while short
MARGIN_BYTES = 4096  # tokens starting this close to a cut are dropped: they could merge across it


def encode_prefix(read: Reader, tokenizer: Any, need: int | None, suffix: str = "") -> TokenStream:
    """The first ``need`` tokens of a document (all of it, ``suffix`` appended, when ``need`` is None or
    the document is shorter than what is read).  A prefix is encoded and its tokens within
    ``MARGIN_BYTES`` of the cut dropped, so the tokens kept are those of the whole document."""
    chars = None if need is None else max(4096, CHARS_PER_TOKEN * need)
    while True:
        text = read(chars)
        if chars is None or len(text) < chars:
            return encode(text + suffix, tokenizer)
        part = encode(text, tokenizer)
        cutoff = len(text.encode("utf-8")) - MARGIN_BYTES
        kept = sum(1 for start in itertools.accumulate([0, *part.nbytes[:-1]]) if start < cutoff)
        if kept >= need:
            return TokenStream(part.ids[:need], part.nbytes[:need])
        chars *= 4


