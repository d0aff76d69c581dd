# kdfast's commands. `make lint` and `make test` are what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CXX_SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
SOURCES := setup.py $(CXX_SOURCES)

.PHONY: test fuzz soak lint format build demo demo-llm bench info gpu-check gpu-stack-check clean

test: $(VENV)/.built  ## build what changed and run the test suite
	$(PY) -m pytest -q

# Differential fuzzing of every function of kdfast.functional on cpu, triton (interpreted)
# and torch against the float64 reference, hypothesis's `long` profile (random, many more
# examples than the `ci` profile `make test` runs; up to ~15 minutes on 2 cores, less when
# a test fails early: no shrinking, a failure prints its inputs).
# FUZZ_EXAMPLES=n sets the examples per test.
FUZZ_EXAMPLES ?= 500
fuzz: $(VENV)/.built  ## the long differential fuzzing run (tests/test_fuzz.py)
	KDFAST_FUZZ=long KDFAST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# 100 distillation fits in one process (tests/test_soak.py; the test suite runs 20).
soak: $(VENV)/.built  ## 100 fits: nothing left behind, memory flat
	KDFAST_SOAK_FITS=100 $(PY) -m pytest -q -p no:cacheprovider tests/test_soak.py

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

# Distillation on scikit-learn's digits, offline: a ResNet-18 teacher, small CNN students on 100
# labelled images, 3 seeds; plot and numbers in demo_out/. fasterai's tutorial (ResNet-34
# teacher, ResNet-18 students): make demo DEMO_ARGS="--setting tutorial"
DEMO_ARGS ?=
demo: $(VENV)/.built  ## what distillation buys on a small image task, offline
	$(PY) -m kdfast.cli demo $(DEMO_ARGS)

# A causal LM distilled with the Hugging Face Trainer, offline (Python's own documentation as
# text): a Llama teacher, a smaller student alone and with forward KL, reverse KL and JSD;
# perplexity table, plot and numbers in demo_out/llm/. Options: make demo-llm DEMO_ARGS="--steps 60"
demo-llm: $(VENV)/.built  ## a language model distilled with the Hugging Face Trainer, offline
	$(PY) -m kdfast.cli demo llm $(DEMO_ARGS)

bench: $(VENV)/.built  ## benchmarks for this machine's device; results in bench/results/
	$(PY) -m kdfast.cli bench

info: $(VENV)/.built
	$(PY) -m kdfast.cli info

# On the GPU machine (no network, system Python with torch, no fastai): build for its
# architecture, smoke-test every kernel path, run the GPU tests per family and backend,
# write the validation record, benchmark in the time left; files into $OUT (default
# bench/results/), a table last. ONLY=softmax_kl,attention (or relational:cuda) re-runs a
# subset, DEADLINE=seconds (400), BENCH=0 skips the benchmarks. See tests/gpu_check.py.
ONLY ?=
DEADLINE ?= 400
gpu-check:  ## on a GPU machine: every kernel path proven in one short run
	$(PYTHON) tests/gpu_check.py --only "$(ONLY)" --deadline $(DEADLINE)

# The GPU machine's software (Python 3.12, torch 2.11.0 CUDA 13.0 build, triton 3.6.0,
# numpy < 2.4: triton 3.6's interpreter fails with numpy 2.4.6 and 2.5, "only 0-dimensional
# arrays can be converted to Python scalars") in a venv of its own: build
# kdfast for sm_90 there and run the test suite (fastai's tests skip: that machine has no
# fastai), so that an API newer than those versions never reaches the GPU untested.
# Python 3.12 is python3.12 on PATH, or PYTHON312=/path/to/python3.12.
PYTHON312 ?= python3.12
STACK_VENV := .venv-gpu-stack
STACK_PY := $(STACK_VENV)/bin/python
GPU_STACK := torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest ninja setuptools wheel  # what the GPU machine has

$(STACK_VENV)/.installed:
	@$(PYTHON312) -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' 2>/dev/null || \
		{ echo "gpu-stack-check needs Python 3.12: put python3.12 on PATH or pass PYTHON312=/path/to/python3.12"; exit 2; }
	$(PYTHON312) -m venv $(STACK_VENV)
	$(STACK_PY) -m pip install $(GPU_STACK)
	touch $@

gpu-stack-check: $(STACK_VENV)/.installed  ## the CPU tests on the GPU machine's Python, torch and triton
	TORCH_CUDA_ARCH_LIST=9.0 $(STACK_PY) setup.py build_ext --inplace
	$(STACK_PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf build kdfast/_C*.so $(VENV)/.built
