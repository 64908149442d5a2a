# Two targets do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this machine's pip serves; an unpinned torch pulls a CUDA build of GBs.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bayesdl demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks examples
	$(PY) -m ruff check --fix src tests benchmarks examples

# Comparison rows of the VI benchmark use other libraries' Bayesian layers; --no-deps keeps pip
# from replacing the CPU torch (their metadata asks for torchvision).
BENCH_LIBS := bayesian-torch==0.5.0 blitz-bayesian-pytorch==0.2.8

bench: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(BENCH_LIBS)
	$(PY) -m benchmarks.speed

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
