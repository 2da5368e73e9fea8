# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The serve-gpu extra (onnxruntime-gpu) where a CUDA GPU is present, serve (plain onnxruntime)
# otherwise: never both, they ship the same module.
SERVE := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo serve-gpu || echo serve)
STAMP := $(VENV)/.fastprompt-installed

.PHONY: install demo test bench build clean device-wheels

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/*.cpp csrc/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q setuptools wheel ninja
	# Without build isolation, so the extension builds against the torch just installed.
	$(PY) -m pip install -q --no-build-isolation -e ".[train,$(SERVE),test]"
	@touch $@

demo: $(STAMP)
	$(PY) -m fastprompt demo

# lint-imports: the layers of docs/design.md (contracts in pyproject.toml) hold.
# FASTPROMPT_REQUIRE_EXTENSION: a C++ extension that fails to build or load fails the run.
test: $(STAMP)
	$(VENV)/bin/lint-imports
	FASTPROMPT_REQUIRE_EXTENSION=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_clip_cross_entropy.py

# Rebuild the C++ extension after editing csrc/.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

clean:
	rm -rf build fastprompt/*.so *.egg-info

# Wheels the GPU machine's image lacks (for CPython 3.12 on x86-64), carried to it for bench/device_check.sh.
device-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
