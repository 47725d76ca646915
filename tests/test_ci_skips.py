"""The CI rule: under CI=true a skip for a missing tool fails; elsewhere it stays a skip with its reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PROBE = '''
import pytest

def test_missing_peer():
    pytest.importorskip("quantsink_no_such_module_xyz")

def test_missing_chromium():
    pytest.skip("missing tool: chromium")

def test_other_skip():
    pytest.skip("not applicable on this platform")
'''


def _run(tmp_path: Path, ci: str) -> str:
    (tmp_path / "conftest.py").write_text((HERE / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {"PATH": "/usr/bin:/bin", "CI": ci, "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("ci, expected", [("true", "2 failed, 1 skipped"), ("", "3 skipped")])
def test_missing_tool_skips_fail_only_in_ci(tmp_path, ci, expected):
    assert expected in _run(tmp_path, ci)
