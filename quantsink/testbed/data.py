"""Bigram-Backcopy (BB), the synthetic task of Guo et al. (2024), over python-docs characters.

The paper builds BB on Tiny Shakespeare's 65 characters; quantsink ships no Shakespeare, so the
text here is the English prose of CPython's bundled documentation topics (``pydoc_data.topics``,
the ``python-docs`` corpus, topics joined in sorted order).  Its 65 most frequent characters
(99.5% of the text) are the vocabulary, plus the paper's special tokens:

* ``<s>`` (BOS, token string ``⟨s⟩``) starts every sequence and is never generated afterwards;
* ``<d>`` (the paper's delimiter, generated with probability 0, kept for vocabulary parity),
  ``<pad>`` and ``<unk>`` (for the tokenizer only).

Special token strings use U+27E8/U+27E9 brackets, which are not in the vocabulary, so no
sequence of characters can spell a special token.

Generation (the paper's ``bbm.gen_seq``): ``x0 = <s>``; ``x1`` from the character marginal with
the triggers removed; then for t >= 2, if ``x_{t-1}`` is a trigger, ``x_t = x_{t-2}`` (backcopy),
else ``x_t ~ P(. | x_{t-1})``, the bigram transition estimated from the text's character-pair
counts (pairs with a character outside the vocabulary are dropped).  Triggers are the ``k`` most
frequent characters (paper: k = 3).
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BOS, DELIM, PAD, UNK = "⟨s⟩", "⟨d⟩", "⟨pad⟩", "⟨unk⟩"
SPECIALS = (BOS, DELIM, PAD, UNK)
TEXT_SOURCE = "python-docs: pydoc_data.topics, topics in sorted order joined by blank lines"


@dataclass(frozen=True)
class BigramBackcopy:
    """The task: vocabulary, bigram transition matrix, triggers, sequence length."""

    chars: tuple[str, ...]  # the vocabulary's characters, most frequent first; ids 0..len-1
    marginal: tuple[float, ...]  # (V_chars,) character frequencies
    transition: tuple[tuple[float, ...], ...]  # (V_chars, V_chars) rows sum to 1
    k: int = 3
    seq_len: int = 256  # model inputs per sequence, <s> included

    def __post_init__(self) -> None:
        rows = np.asarray(self.transition)
        if rows.shape != (len(self.chars), len(self.chars)) or not np.allclose(rows.sum(1), 1):
            raise ValueError("transition must be a square row-stochastic matrix over the characters")
        if not 1 <= self.k < len(self.chars):
            raise ValueError(f"k={self.k}: need 1 <= k < {len(self.chars)} triggers")

    # -- vocabulary

    @property
    def vocab(self) -> tuple[str, ...]:
        return self.chars + SPECIALS

    @property
    def bos_id(self) -> int:
        return len(self.chars)

    @property
    def triggers(self) -> tuple[int, ...]:
        """Trigger ids: the k most frequent characters (ids are in frequency order)."""
        return tuple(range(self.k))

    def decode(self, ids: Any) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    # -- generation

    def first_token_probs(self) -> np.ndarray:
        """The marginal with the triggers removed, renormalised: (V_chars,)."""
        probs = np.asarray(self.marginal, dtype=np.float64).copy()
        probs[list(self.triggers)] = 0.0
        return probs / probs.sum()

    def sample(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """``batch`` sequences of ``seq_len + 1`` ids (inputs and one more target): (B, T+1)."""
        cdf = np.cumsum(np.asarray(self.transition), axis=1)  # (V, V)
        cdf[:, -1] = 1.0
        is_trigger = np.zeros(len(self.chars), dtype=bool)
        is_trigger[list(self.triggers)] = True
        seqs = np.empty((batch, self.seq_len + 1), dtype=np.int64)  # (B, T+1)
        seqs[:, 0] = self.bos_id
        seqs[:, 1] = rng.choice(len(self.chars), size=batch, p=self.first_token_probs())
        for t in range(2, self.seq_len + 1):
            prev = seqs[:, t - 1]  # (B,)
            bigram = (cdf[prev] < rng.random(batch)[:, None]).sum(1)  # (B,) inverse-cdf draw
            seqs[:, t] = np.where(is_trigger[prev], seqs[:, t - 2], bigram)
        return seqs

    def trigger_mask(self, ids: Any) -> Any:
        """True where a token is a trigger (its next token is a backcopy)."""
        return np.isin(np.asarray(ids), self.triggers)

    # -- persistence (JSON, never pickle)

    def to_dict(self) -> dict[str, Any]:
        return {"chars": list(self.chars), "marginal": list(self.marginal),
                "transition": [list(r) for r in self.transition], "k": self.k, "seq_len": self.seq_len,
                "text": TEXT_SOURCE, "specials": {"bos": BOS, "delimiter": DELIM, "pad": PAD, "unk": UNK}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BigramBackcopy":
        return cls(tuple(data["chars"]), tuple(data["marginal"]), tuple(tuple(r) for r in data["transition"]),
                   int(data["k"]), int(data["seq_len"]))


def python_docs_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def from_text(text: str, *, n_chars: int = 65, k: int = 3, seq_len: int = 256) -> BigramBackcopy:
    """The task over ``text``'s ``n_chars`` most frequent characters (ties broken by code point)."""
    counts = collections.Counter(text)
    chars = tuple(sorted(counts, key=lambda c: (-counts[c], c))[:n_chars])
    index = {c: i for i, c in enumerate(chars)}
    pairs = np.zeros((len(chars), len(chars)), dtype=np.float64)  # (V, V)
    for a, b in zip(text, text[1:]):
        if a in index and b in index:
            pairs[index[a], index[b]] += 1
    pairs[pairs.sum(1) == 0] = 1.0  # a character never followed by a vocabulary one: uniform
    transition = pairs / pairs.sum(1, keepdims=True)
    marginal = np.array([counts[c] for c in chars], dtype=np.float64)
    marginal /= marginal.sum()
    return BigramBackcopy(chars, tuple(marginal.tolist()), tuple(map(tuple, transition.tolist())), k, seq_len)


def default_task(k: int = 3, seq_len: int = 256) -> BigramBackcopy:
    """BB over python-docs characters (65 + specials), the testbed's task."""
    return from_text(python_docs_text(), k=k, seq_len=seq_len)


def build_tokenizer(task: BigramBackcopy) -> Any:
    """A character-level fast tokenizer: one token per character, ``<s>`` as BOS, no BOS added by default."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(task.vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=PAD, unk_token=UNK)


def write_heldout(task: BigramBackcopy, path: Path, *, n: int, seed: int) -> None:
    """``n`` held-out sequences as a .jsonl corpus: ``text`` = the ``seq_len - 1`` characters after ``<s>``.

    ``quantsink eval --protocol lm-eval --window <seq_len - 1>`` then scores each as one row
    ``<s> x1 .. x_{T-1}``: exactly the positions the model was trained on.
    """
    from ..io import atomic_write_text

    seqs = task.sample(np.random.default_rng([seed, 2]), n)[:, 1:task.seq_len]  # (n, T-1) without <s>
    atomic_write_text(path, "".join(json.dumps({"text": task.decode(row)}) + "\n" for row in seqs))
