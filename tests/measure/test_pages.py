"""Kept pages: inside a pass, a freed big tensor's pages serve the next one (no page faults); a run gives
the memory back once, at its end; ``QUANTSINK_MALLOC=default`` leaves malloc alone."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from quantsink.measure import pages

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")


def _faults_of_a_new_tensor(megabytes: int = 64) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(megabytes << 18)  # float32: 4 bytes each
    t.fill_(1.0)  # touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_a_kept_pass_reuses_a_freed_tensors_pages():
    with pages.kept_pages(give_back=False):
        assert pages.keep_pages()
        _faults_of_a_new_tensor()  # the first one may fault its pages in
        again = _faults_of_a_new_tensor()
    assert again < 64 * 256 // 10  # 64 MB is 16,384 pages; mmap'd afresh it would fault each one


class _CountingLibc:
    def __init__(self):
        self.trims = 0
        self.options: list[tuple[int, int]] = []

    def mallopt(self, option: int, value: int) -> int:
        self.options.append((option, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_the_outermost_run_gives_the_memory_back_once_and_passes_never(monkeypatch):
    libc = _CountingLibc()
    monkeypatch.setattr(pages, "_glibc", lambda: libc)
    monkeypatch.setitem(pages._state, "set", None)
    monkeypatch.delenv("QUANTSINK_MALLOC", raising=False)
    with pages.kept_pages():  # a run
        with pages.kept_pages(give_back=False), pages.kept_pages():  # a pass, a nested run
            pass
        assert libc.trims == 0
    assert libc.trims == 1
    with pages.kept_pages(give_back=False):  # a pass called on its own
        pass
    assert libc.trims == 1
    assert libc.options == [(pages.M_MMAP_THRESHOLD, pages.KEEP_BYTES), (pages.M_TRIM_THRESHOLD, pages.KEEP_BYTES)]


def test_quantsink_malloc_default_leaves_malloc_alone(monkeypatch):
    libc = _CountingLibc()
    monkeypatch.setattr(pages, "_glibc", lambda: libc)
    monkeypatch.setitem(pages._state, "set", None)
    monkeypatch.setenv("QUANTSINK_MALLOC", "default")
    with pages.kept_pages():
        pass
    assert not pages.keep_pages() and libc.options == [] and libc.trims == 0


def test_no_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(pages, "_glibc", lambda: None)
    monkeypatch.setitem(pages._state, "set", None)
    monkeypatch.delenv("QUANTSINK_MALLOC", raising=False)
    with pages.kept_pages():
        pass
    assert not pages.keep_pages()
