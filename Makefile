# Two commands on a fresh machine: `make demo` and `make test` (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: a plain `torch` requirement would pull GBs of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The board side on the oldest Python here (JetPack 5 ships 3.8): a venv with only the
# `board` extra, which tests/test_board_python.py runs the board modules in. Skipped (with a
# message) where no Python 3.8-3.9 exists or the package index cannot be reached.
BOARD_VENV ?= .venv-board
BOARD_PY ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.8*/bin/python3.8) $(shell command -v python3.8 2>/dev/null) $(shell command -v python3.9 2>/dev/null))

.PHONY: install ort-headers board-venv demo test test-slow bench lint clean gpu-check arm64-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(MAKE) --no-print-directory ort-headers
	touch $(STAMP)

install: $(STAMP)

# ONNX Runtime's C API header for the edgediag::SelectiveScan custom op (export --scan-op
# custom): Debian's libonnxruntime-dev, pinned and sha256-checked, into $$EDGEDIAG_CACHE.
# Best effort: without it that op is unavailable (and its tests skip), nothing else changes.
ort-headers:
	-$(BIN)/python -m edgediag.runtime.custom_ops fetch-headers

$(BOARD_VENV)/.installed: pyproject.toml
	@if [ -z "$(BOARD_PY)" ]; then echo "board-venv: no Python 3.8/3.9 here: skipped"; exit 0; fi; \
	  rm -rf $(BOARD_VENV) && $(BOARD_PY) -m venv $(BOARD_VENV) && \
	  $(BOARD_VENV)/bin/python -m pip install -q -e '.[board]' && touch $@ \
	  || { echo "board-venv: install failed: skipped"; rm -rf $(BOARD_VENV); }

board-venv: $(BOARD_VENV)/.installed

demo: $(STAMP)
	$(BIN)/python -m edgediag.demo

test: $(STAMP) board-venv
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks --benchmark-only -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check edgediag tests benchmarks

# The scan kernels built for aarch64 (Jetson's NEON) and tested under qemu: installs the
# cross compiler and qemu-user from Debian when missing (needs apt and root).
arm64-check: $(STAMP)
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_scan_kernel_harness.py -rs

gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(BOARD_VENV) export/demo .pytest_cache
