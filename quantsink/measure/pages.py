"""Keep a pass's memory pages from one batch to the next (glibc's malloc): no page faults per batch.

A pass allocates the same tensors batch after batch: the output head's logits (hundreds of MB) and
the body's activations.  glibc's malloc serves an allocation above its mmap threshold (dynamic, at
most 32 MB) from fresh ``mmap`` pages and hands a freed heap top back to the kernel, so every batch
faults its pages in again and the kernel zeroes them: on smollm2's reference pass over 4,294 tokens,
830,000-1,010,000 minor faults and 1.5-2.1 s of system time.  Kept, an isolated reference pass repeated in
one process ran 9-15% faster (no faults after the first pass), and ``scripts/bench_eval.py``'s 3-5%.

Inside :func:`kept_pages` the process's malloc keeps them: ``M_MMAP_THRESHOLD`` and
``M_TRIM_THRESHOLD`` of 1 GiB, set once for the process (glibc has no call that restores its dynamic
thresholds, so code that runs later in the process keeps pages too), and a run ends with
``malloc_trim(0)``, which gives the free memory back.  Numbers do not move: this changes where
memory comes from, not what is computed.  ``QUANTSINK_MALLOC=default`` leaves malloc alone; where
the C library is not glibc (macOS, musl) it is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from functools import cache
from typing import Any, Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_BYTES = 1 << 30
_state = {"set": None}  # None: not tried yet; then whether the thresholds were set
_depth = threading.local()


@cache
def _glibc() -> Any | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_pages() -> bool:
    """Set the thresholds once per process; whether they are set."""
    if _state["set"] is None:
        libc = _glibc() if os.environ.get("QUANTSINK_MALLOC", "keep") != "default" else None
        _state["set"] = bool(libc and libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)
                             and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    return bool(_state["set"])


@contextmanager
def kept_pages(give_back: bool = True) -> Iterator[None]:
    """Freed memory stays with the process inside the block.  The outermost block with ``give_back``
    (a run: ``compare_passes``) hands it back on exit; a pass (``run_pass``) does not, so passes called
    one after another keep their pages (glibc still returns a free heap top above ``KEEP_BYTES``)."""
    kept = keep_pages()
    if not give_back:
        yield
        return
    _depth.n = getattr(_depth, "n", 0) + 1
    try:
        yield
    finally:
        _depth.n -= 1
        if kept and _depth.n == 0:
            _glibc().malloc_trim(0)
