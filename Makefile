# From a fresh clone, each target makes its virtual environment first (scripts/setup.sh: torch, the
# CPU build when there is no GPU, then distill; skipped when VENV is already complete).
#
#   make demo        the offline demo: teacher, student alone, distilled student, 5 seeds
#   make test        the whole test suite on 2 processes (CI runs exactly this: .ci/run)
#   make test-fast   the fast tier: tests marked `fast` (about 3 minutes on 2 cores)
#
# Variables: VENV (default .venv), PYTHON (makes the venv; default python3), ARGS (more
# arguments for `distill demo`, e.g. make demo ARGS="--seeds 0,1").

VENV ?= .venv
PYTHON ?= python3
ARGS ?=
SETUP = VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/setup.sh
BIN = $(VENV)/bin

.PHONY: demo test test-fast setup setup-test

demo: setup
	$(BIN)/distill demo $(ARGS)

test: setup-test
	$(BIN)/python -m pytest -n 2 tests

test-fast: setup-test
	$(BIN)/python -m pytest -n 2 -m fast tests

setup:
	@$(SETUP)

setup-test:
	@$(SETUP) test
