"""A file corpus is read and tokenized only as far as the run needs (issue 31, case 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantsink.data.corpus import load_corpus, tokenize
from quantsink.errors import UsageError

PROBE = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a run that reads the whole file dies here, not the machine
from quantsink.data.corpus import load_corpus, tokenize

class Chars:  # a character-level tokenizer: its memory grows with the text it is given
    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        return {"input_ids": [ord(c) % 256 for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
corpus = load_corpus("file:" + sys.argv[1])
stream = tokenize(corpus, Chars(), limit=512)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"tokens": len(stream), "grown_kib": grown, "sha": corpus.sha256, "docs": corpus.n_documents}))
"""


def test_a_200_mb_file_scores_512_tokens_in_bounded_memory(tmp_path):
    path = tmp_path / "big.txt"
    block = ("The attention sink takes the mass no other token wants. " * 18 + "\n") * 1000  # ~1 MB
    with path.open("w") as handle:
        for _ in range(200):
            handle.write(block)
    assert path.stat().st_size > 200e6
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["tokens"] == 512 and out["docs"] == 1 and len(out["sha"]) == 64
    assert out["grown_kib"] < 64 * 1024, out  # the file is 200 MB; hashing streams it, tokenizing reads ~4 kB


def test_streamed_corpus_is_the_same_corpus(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from quantsink.data.corpus import Corpus

    text = Path(__file__).read_text() * 40  # ~100 kB: read as a prefix, not whole
    (tmp_path / "doc.txt").write_text(text)
    streamed = load_corpus(f"file:{tmp_path / 'doc.txt'}")
    whole = Corpus.of("x", [text])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert streamed.sha256 == whole.sha256 and streamed.documents == whole.documents
    full = tokenize(whole, tok)
    part = tokenize(streamed, tok, 700)
    assert part.ids == full.ids[:700] and part.nbytes == full.nbytes[:700]


def test_jsonl_documents_stream_and_hash_as_joined(tmp_path):
    from quantsink.data.corpus import Corpus

    texts = ["first document", "  ", "second one", "third"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n")
    corpus = load_corpus(f"file:{tmp_path / 'd.jsonl'}")
    assert corpus.sha256 == Corpus.of("x", texts).sha256 and corpus.n_documents == 3
    assert corpus.documents == ("first document", "second one", "third")


def test_a_fifo_and_a_symlink_loop_are_named_for_what_they_are(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        load_corpus(f"file:{fifo}")
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    with pytest.raises(UsageError, match="symlink loop"):
        load_corpus(f"file:{loop}")
