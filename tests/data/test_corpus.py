import json

import pytest
import torch

from quantsink.data.corpus import Corpus, TokenStream, load_corpus, tokenize
from quantsink.data.windows import sliding_windows
from quantsink.errors import QuantsinkError, UsageError


def stream(n: int) -> TokenStream:
    return TokenStream(list(range(100, 100 + n)), [1 + (i % 3) for i in range(n)])


@pytest.mark.parametrize("window,stride,prefix,n", [
    (4, 4, None, 10), (4, 2, None, 10), (4, 3, 7, 17), (8, 1, None, 20), (5, 5, 7, 25), (6, 4, 7, 30)])
def test_every_scored_token_scored_exactly_once(window, stride, prefix, n):
    s = stream(n)
    windows, used = sliding_windows(s, window=window, stride=stride, prefix=prefix, max_tokens=n)
    lead = 0 if prefix is None else 1
    scored_ids = [int(t) for row, mask in zip(windows.input_ids, windows.scored) for t in row[mask]]
    assert len(scored_ids) == len(set(scored_ids)) == windows.n_scored
    # every token of the consumed span is scored, except (without a prefix) a window's first
    # token when no earlier window reached it: it has no context
    starts = list(range(0, used - window + 1, stride))
    unscored = set() if prefix is not None else {
        s.ids[st] for k, st in enumerate(starts) if k == 0 or starts[k - 1] + window <= st}
    expected = [t for t in s.ids[:used] if t not in unscored]
    assert sorted(scored_ids) == expected
    assert not windows.scored[:, :lead + (prefix is None)].any()
    if prefix is not None:
        assert (windows.input_ids[:, 0] == prefix).all() and windows.sink_positions == (0,)
    # bytes are those of the scored tokens
    byte_of = dict(zip(s.ids, s.nbytes))
    assert int(windows.nbytes.sum()) == sum(byte_of[t] for t in scored_ids)


def test_budget_drops_partial_window_and_is_deterministic():
    a, used = sliding_windows(stream(100), window=16, stride=16, prefix=None, max_tokens=40)
    b, _ = sliding_windows(stream(100), window=16, stride=16, prefix=None, max_tokens=40)
    assert used == 32 and len(a) == 2
    assert torch.equal(a.input_ids, b.input_ids)


def test_text_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(QuantsinkError, match="text shorter than a window: 10 tokens < --window 16"):
        sliding_windows(stream(10), window=16, stride=16, prefix=None, max_tokens=100)


def test_embedded_corpora_are_stable_and_distinct():
    docs, code = load_corpus("python-docs"), load_corpus("python-code")
    assert docs.sha256 == load_corpus("docs").sha256
    assert docs.sha256 != code.sha256
    assert docs.n_chars > 100_000 and code.n_chars > 100_000
    assert "def " in code.documents[0] and "def " not in docs.documents[0][:200]


def test_file_corpora(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world", encoding="utf-8")
    assert load_corpus(f"file:{txt}").documents == ("hello world",)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_corpus(f"file:{jsonl}").documents == ("one", "two")


@pytest.mark.parametrize("content,message", [
    ("", "is empty"), ("   \n", "is empty"), ('{"txt": 1}\n', "not a JSON object with a 'text' field"),
    ("not json\n", "not a JSON object")])
def test_bad_corpus_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(QuantsinkError, match=message):
        load_corpus(f"file:{path}")


def test_missing_file_and_unknown_corpus():
    with pytest.raises(QuantsinkError, match="does not exist"):
        load_corpus("file:/nonexistent/x.txt")
    with pytest.raises(UsageError, match="Did you mean 'python-docs'"):
        load_corpus("python-doc")


def test_wikitext2_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QuantsinkError) as err:
        load_corpus("wikitext2", offline=True)
    assert "offline mode is on" in str(err.value) and "python-docs" in str(err.value)
    assert "\n" not in str(err.value)


def test_wikitext2_online_asks_the_hub_and_offline_only_the_cache(monkeypatch):
    import datasets

    seen = []

    def fake_load(*args, download_config=None, **kwargs):
        seen.append(download_config.local_files_only)
        return {"text": ["a b c"]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_corpus("wikitext2").documents == ("a b c",)
    load_corpus("wikitext2", offline=True)
    assert seen == [False, True]


def test_token_bytes_partition_the_text(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    corpus = Corpus.of("t", ["héllo wörld — ünïcode", "second doc"])
    s = tokenize(corpus, tok)
    assert sum(s.nbytes) == len("héllo wörld — ünïcode\n\nsecond doc".encode("utf-8"))
    assert tokenize(corpus, tok, limit=5).ids == s.ids[:5]
