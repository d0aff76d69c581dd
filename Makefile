# kdfast's commands. `make lint` and `make test` are what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CXX_SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
SOURCES := setup.py $(CXX_SOURCES)

.PHONY: test lint format build demo bench info gpu-check clean

test: $(VENV)/.built  ## build what changed and run the test suite
	$(PY) -m pytest -q

# ruff for Python (rules in pyproject.toml), clang-format for C++/CUDA (.clang-format): checks only.
lint: $(VENV)/.installed  ## check the Python and C++/CUDA style
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(VENV)/.installed  ## apply clang-format, and ruff's safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

build: $(VENV)/.built

# The virtual environment with torch (from local files: a CUDA build, compiled against but
# not run without a GPU), then kdfast in editable mode with its test extras; that install
# builds kdfast._C once. `--no-build-isolation`: compile against this torch.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e ".[test]" --no-build-isolation
	touch $@ $(VENV)/.built

# Rebuild kdfast._C in place after a source change (ninja compiles only what changed).
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) setup.py build_ext --inplace
	touch $@

# fasterai's distillation tutorial, offline (scikit-learn's digits): ResNet-34 teacher, three
# ResNet-18 students; plot and numbers in demo_out/. Options: make demo DEMO_ARGS="--epochs 1"
DEMO_ARGS ?=
demo: $(VENV)/.built  ## the fasterai distillation tutorial, offline
	$(PY) -m kdfast.cli demo $(DEMO_ARGS)

bench: $(VENV)/.built  ## benchmarks for this machine's device; results in bench/results/
	$(PY) -m kdfast.cli bench

info: $(VENV)/.built
	$(PY) -m kdfast.cli info

# On the GPU machine (no network, system Python with torch, no fastai): build for sm_90,
# run the GPU tests and benchmarks, results and logs into $OUT (default bench/results/).
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

clean:
	rm -rf build kdfast/_C*.so $(VENV)/.built
