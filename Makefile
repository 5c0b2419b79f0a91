# Quick start: `make demo` (install + run the built-in DPO demo), `make test` (install + run the tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,bench,lora,experiments,report,quantize]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/directpo demo

# Two pytest-xdist workers (the machines have 2 cores; most tests wait on a training subprocess),
# long tests stolen by whichever worker is free: 13.5 -> 9 min here. `pytest` alone runs serially.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "slow or not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
