"""More --calib-windows than the corpus leaves is refused before any pass (issue 31, case 7)."""

from __future__ import annotations

import pytest

from quantsink.config import RunConfig
from quantsink.errors import UsageError
from quantsink.pipeline.run import Session, prepare


def _config(tiny_model_dir, tiny_text_file, **changes):
    return RunConfig(model=str(tiny_model_dir), corpus=f"file:{tiny_text_file}", scheme="w8a8", window=32,
                     max_tokens=128, calib_windows=4, stats=False, device="cpu", protocol="windows").replace(**changes)


def test_more_calibration_windows_than_left_is_refused(tiny_model_dir, tiny_text_file):
    session = Session()
    prep = prepare(_config(tiny_model_dir, tiny_text_file), session)
    assert len(prep.calibration()) == 4
    with pytest.raises(UsageError, match=r"--calib-windows 100000: only \d+ calibration windows of 32 tokens") as err:
        prepare(_config(tiny_model_dir, tiny_text_file, calib_windows=100000), session)
    assert "\n" not in str(err.value)


def test_a_scheme_without_static_ranges_is_not_held_to_it(tiny_model_dir, tiny_text_file):
    prepare(_config(tiny_model_dir, tiny_text_file, scheme="w8a8-dyn", calib_windows=100000), Session())
