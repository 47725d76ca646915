"""The documents protocol: windows drawn across the corpus, calibration from other documents."""

import pytest

from quantsink.config import RunConfig
from quantsink.data.corpus import Corpus
from quantsink.data.windows import PROTOCOLS, document_order, round_robin
from quantsink.errors import QuantsinkError, UsageError


class CharTokenizer:
    """One token per character (id = code point % 97 + 1), no BOS: enough for the window protocols."""

    bos_token_id = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) % 97 + 1 for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def _corpus(sizes):
    """Document i: its letter and a digit alternating (``A0A1A2...``), ``size`` characters."""
    return Corpus.of("t", ["".join(chr(65 + i) + chr(48 + k % 10) for k in range(size // 2))
                           for i, size in enumerate(sizes)])


def _letters(windows):
    return {chr(int(windows.input_ids[i, 0]) - 1) for i in range(len(windows))}


def _made(sizes, **config):
    settings = {"window": 8, "max_tokens": 8 * 6, "calib_windows": 2, "stats_windows": 0, **config}
    return PROTOCOLS.get("documents")(RunConfig(**settings), _corpus(sizes), CharTokenizer())


def test_round_robin_takes_one_window_per_document_first():
    assert round_robin({5: 2, 1: 1, 3: 3}, 5) == [(5, 0), (1, 0), (3, 0), (5, 1), (3, 1)]
    assert round_robin({5: 1}, 3) == [(5, 0)]


def test_n_windows_come_from_n_documents_and_calibration_from_others():
    made = _made([16] * 12)  # 12 documents of two windows: 9 evaluate, 3 calibrate
    docs = made.protocol["window_documents"]
    assert len(made.windows) == 6 and made.protocol["documents"] == 6 == len(set(docs))
    assert made.protocol["calibration_documents"] == 3
    assert not _letters(made.windows) & _letters(made.calibration(0))
    # each window lies inside its document: one letter per row, the document the record names
    corpus = _corpus([16] * 12)
    for i, d in enumerate(docs):
        assert set(made.windows.input_ids[i, ::2].tolist()) == {ord(corpus.documents[d][0]) % 97 + 1}


def test_more_windows_than_documents_go_round_robin_and_scoring_skips_each_first_token():
    made = _made([40, 40, 40, 40, 40])  # 4 evaluate (5 windows each), 1 calibrates
    assert len(made.windows) == 6 and made.protocol["documents"] == 4
    assert made.windows.n_scored == 6 * 7  # no BOS: a window's first token has no context
    assert not made.windows.scored[:, 0].any()


def test_calibration_draws_are_disjoint_and_a_draw_past_the_supply_is_refused():
    made = _made([16] * 6 + [40, 40])  # 2 calibration documents of 5 windows
    draws = [made.calibration(d) for d in range(2)]
    rows = [tuple(w.input_ids[i].tolist()) for w in draws for i in range(len(w))]
    assert len(draws[0]) == len(draws[1]) == 2 and len(rows) == len(set(rows)) == 4
    with pytest.raises(QuantsinkError, match="calibration draw 20"):
        made.calibration(19)


def test_the_order_is_seeded_and_deterministic():
    corpus = _corpus([16] * 12)
    assert document_order(corpus, 0) == document_order(corpus, 0)
    assert document_order(corpus, 0) != document_order(corpus, 1)
    assert _made([16] * 12).protocol == _made([16] * 12).protocol
    assert _made([16] * 12, seed=1).protocol["window_documents"] != _made([16] * 12).protocol["window_documents"]


def test_one_long_document_is_cut_as_the_windows_protocol_cuts_it_and_a_stride_is_refused():
    made = _made([200, 3, 3])
    fixed = PROTOCOLS.get("windows")(RunConfig(window=8, max_tokens=48, calib_windows=2, stats_windows=0),
                                     _corpus([200, 3, 3]), CharTokenizer())
    assert made.protocol["documents"] == 1 and "window_documents" not in made.protocol
    assert made.windows.input_ids.tolist() == fixed.windows.input_ids.tolist()
    with pytest.raises(UsageError, match="--stride does not apply to --protocol documents"):
        RunConfig(stride=4, window=8)
