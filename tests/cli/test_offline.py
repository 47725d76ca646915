"""``--offline`` reaches no endpoint at all; a hub id with no network is one line (issue 31, case 8).
A stand-in hub on 127.0.0.1 logs every request; HF_ENDPOINT points at it."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stand_in_hub():
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            requests.append(f"{self.command} {self.path}")
            body = b'{"error": "Repository Not Found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


# the command, then what any later huggingface_hub code would do: a progress bar asks whether an AI agent
# runs it, and that fetches the agent-harness registry from the endpoint unless offline mode is on
SCRIPT = """
import sys
from quantsink.cli import main
try:
    main()
finally:
    from huggingface_hub.utils._detect_agent import is_agent
    is_agent()
"""


def _quantsink(args: list[str], endpoint: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)


EVAL = ["eval", "--model", "org/not-cached", "--corpus", "python-docs", "--scheme", "int8", "--no-stats"]


def test_offline_makes_no_request_at_all(stand_in_hub, tmp_path):
    endpoint, requests = stand_in_hub
    online = _quantsink(EVAL + ["--results", str(tmp_path / "a")], endpoint, tmp_path)
    assert requests, "the stand-in hub is the endpoint: a run that may go online asks it"
    assert online.returncode != 0 and len(online.stderr.strip().splitlines()) <= 2, online.stderr
    requests.clear()
    offline = _quantsink(EVAL + ["--offline", "--results", str(tmp_path / "b")], endpoint, tmp_path)
    assert requests == []
    assert offline.returncode != 0 and "offline mode is on" in offline.stdout + offline.stderr
    assert "Traceback" not in offline.stderr


def test_a_hub_id_with_no_network_is_one_line(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on: every connection is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _quantsink(EVAL + ["--results", str(tmp_path / "r")], f"http://127.0.0.1:{port}", tmp_path)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, lines
    assert "cannot load model 'org/not-cached'" in lines[0] and "Retry" not in lines[0]
