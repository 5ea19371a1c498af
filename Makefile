# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch first, so that no multi-GB CUDA build is pulled in.
TORCH ?= torch==2.13.0

.PHONY: venv demo demo-quick test lint bench clean

$(BIN)/diffdistill: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

venv: $(BIN)/diffdistill

demo: venv
	$(BIN)/diffdistill demo --out demo-report

demo-quick: venv
	$(BIN)/diffdistill demo --quick --out demo-report

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest -n 2  # two workers: the machines have 2 cores; each test runs one thread

bench: venv
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) demo-report .pytest_cache .ruff_cache
