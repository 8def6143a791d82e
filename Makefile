# Set-up is idempotent: a second `make setup` only checks and returns.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.leancnn-setup
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test bench clean-runs

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Keep a torch that is already in the venv; otherwise take the CPU build on disk.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[test]"
	@# The PGD cross-check library, without its torchvision requirement (a multi-GB CUDA build).
	$(PIP) install -q --no-deps "torchattacks==3.5.1"
	@touch $(STAMP)

data: $(STAMP)
	@$(PY) -m leancnn.data.ensure fashion-mnist

demo: setup
	$(VENV)/bin/leancnn bench --quick --out bench/quick

test: setup
	$(PY) -m pytest -q

clean-runs:
	rm -rf runs bench
