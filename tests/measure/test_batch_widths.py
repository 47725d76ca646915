"""A row's numbers do not depend on the rows batched beside it: lm-eval's protocol pads short documents' rows,
and a forward holds rows of one width only, so ``--batch-tokens`` never moves a number."""

import pytest
import torch

from quantsink.data.corpus import TokenStream
from quantsink.data.windows import rolling_windows
from quantsink.measure.passes import ReferenceHead, batches, row_widths, run_pass
from tests.tiny import tiny_llama


def mixed_windows(length: int = 64) -> object:
    """Rows of widths 65 (three full windows of a long document), then 47, 40, 40, 23 (short documents)."""
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, 320, (n,), generator=gen).tolist() for n in (150, 46, 39, 39, 22)]
    return rolling_windows([TokenStream(d, [1] * len(d)) for d in docs], length=length, prefix=0, pad=0)


def test_batches_hold_rows_of_one_width_and_keep_their_boundaries():
    windows = mixed_windows()
    assert row_widths(windows) == [65, 65, 65, 47, 40, 40, 23]
    for rows in batches(windows, batch_tokens=4096, boundaries=(2,)):
        assert len(set(row_widths(windows)[rows])) == 1 and not rows.start < 2 < rows.stop
    assert [(s.start, s.stop) for s in batches(windows, batch_tokens=80)] == \
        [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 7)]  # 80 tokens: two rows of 40 share a forward


@pytest.mark.parametrize("batch_tokens", [65, 130, 200, 4096])
def test_every_number_is_the_same_whatever_batch_tokens(batch_tokens):
    tiny, noisy = tiny_llama(320, seed=1), tiny_llama(320, seed=2)
    windows = mixed_windows()

    def run(tokens: int) -> tuple:
        ref = run_pass(tiny, windows, keep_targets=True, batch_tokens=tokens)
        return ref, run_pass(noisy, windows, reference=ref.targets, reference_head=ReferenceHead.of(tiny),
                             batch_tokens=tokens)
    (ref, cand), (ref_alone, cand_alone) = run(batch_tokens), run(1)  # 1: every row alone
    assert torch.equal(ref.token_nll, ref_alone.token_nll) and torch.equal(cand.token_nll, cand_alone.token_nll)
    assert torch.equal(cand.token_kl, cand_alone.token_kl) and float(cand.kl.sum()) > 0
    assert torch.equal(ref.targets.expected_embedding, ref_alone.targets.expected_embedding)
