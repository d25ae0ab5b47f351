# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo needs the project alone: not the test extra's torch, whose default Linux wheel brings
# gigabytes of CUDA libraries (the install counts against the demo's minutes).
DEMO_STAMP := $(VENV)/.installed-demo
DEMO_ARGS ?=

.PHONY: demo test install clean

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The converter's parity tests: torch (CPU) and the port's module, without its torchvision.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-deps pretrainedmodels==0.7.4
	touch $(STAMP)

install: $(STAMP)

# The five variants on digits under the paper's protocol, two seeds each, evaluated and ensembled,
# and the Figure 1 MLP: demo_output/.
# `make demo DEMO_ARGS=--quick` runs a tiny version.
demo: $(DEMO_STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
