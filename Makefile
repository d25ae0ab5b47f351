# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo needs the project alone: not the test extra's torch, whose default Linux wheel brings
# gigabytes of CUDA libraries (the install counts against the demo's minutes).
DEMO_STAMP := $(VENV)/.installed-demo
DEMO_ARGS ?=
# pip byte-compiles what it installs one file at a time (TensorFlow's and torch's thousands: 60 of
# the install's 115 s on 2 cores); compileall does it on every core once the installs are done,
# passing over what no command or test imports (30% of the files; 32 s instead of 51 s on 2 cores):
# whole packages that torch, timm and the build tools bring (sympy, networkx, pip, ...), torch's
# compiler, TFDS's scripts and test folders. A module passed over still imports, uncached. They must
# be compiled here: where PYTHONDONTWRITEBYTECODE is set, imports never cache them. Like pip,
# compileall passes over the few files written for newer Pythons (`|| true`).
PIP_INSTALL := $(BIN)/python -m pip install --quiet --no-compile
NEVER_IMPORTED := /site-packages/(sympy|networkx|pip|setuptools|timm|torch/(_inductor|_dynamo|onnx)|$\
  tensorflow_datasets/scripts)/|/tests/
COMPILE := $(BIN)/python -m compileall -q -j 0 -x '$(NEVER_IMPORTED)' $(VENV)/lib > /dev/null || true

.PHONY: demo test install clean gpu-wheels

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e .
	$(COMPILE)
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[test]'
	# The converter's parity tests: torch (CPU) and the port's module, without its torchvision.
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) --no-deps pretrainedmodels==0.7.4
	# ReaL's published real.json for the evaluation-set tests, byte-identical inside timm's wheel.
	$(PIP_INSTALL) --no-deps timm==1.0.31
	$(COMPILE)
	touch $(STAMP)

install: $(STAMP)

# The five variants on digits under the paper's protocol, two seeds each, evaluated and ensembled,
# and the Figure 1 MLP: demo_output/.
# `make demo DEMO_ARGS=--quick` runs a tiny version.
demo: $(DEMO_STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

# Every test runs: a missing torch or port fails the converter's parity tests instead of skipping
# them (tests/optional_deps.py). Test files run in parallel, a file's tests in one process (its
# module fixtures train once): one test process leaves most of a second core idle, as compiling is
# single-threaded. The longest files start first, in tests/conftest.py's order (LONGEST_FIRST).
TEST_PROCESSES ?= auto --maxprocesses=4
test: $(STAMP)
	BN_INCEPTION_REQUIRE_TORCH=1 $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile \
	  --no-loadscope-reorder tests

# The wheels a GPU machine of the `device` tool lacks (scripts/gpu_wheels.txt), for Python 3.12 on
# x86-64 Linux, into .whl/ (git-ignored), which the device call carries: docs/benchmarks.md, "GPU check".
GPU_WHEELS := scripts/gpu_wheels.txt
PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64)
gpu-wheels:
	rm -rf .whl
	grep -v -e '^#' -e '^$$' -e '^pretrainedmodels==' -e '^promise==' $(GPU_WHEELS) | cut -d' ' -f1 | xargs \
	  $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(PLATFORMS) -d .whl
	grep -o -e '^pretrainedmodels==[^ ]*' -e '^promise==[^ ]*' $(GPU_WHEELS) | xargs $(PYTHON) -m pip wheel --quiet --no-deps -w .whl
	ls -l .whl

clean:
	rm -rf $(VENV) .pytest_cache
