# Set-up is idempotent: a second `make setup` only checks and returns.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.leancnn-setup
TORCH_VERSION ?= 2.13.0

.PHONY: setup data kernels demo test bench clean-runs

setup: $(STAMP) data kernels

$(STAMP): pyproject.toml
	@# A torch the user already has (system site-packages) is kept: the venv then sees it.
	@test -x $(PY) || { if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi; }
	@# Keep a torch that is already in the venv; otherwise install the pinned CPU build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[test]"
	@# The PGD cross-check library, without its torchvision requirement (a multi-GB CUDA build).
	$(PIP) install -q --no-deps "torchattacks==3.5.1"
	@touch $(STAMP)

# The library never installs anything: set-up checks the dataset and, as root on Debian,
# installs its package (otherwise `leancnn datasets --check` says how to get it).
data: $(STAMP)
	@$(VENV)/bin/leancnn datasets --check fashion-mnist 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "fashion-mnist: not found; installing Debian package dataset-fashion-mnist"; \
			apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; fi; \
		$(VENV)/bin/leancnn datasets --check fashion-mnist; }

# The compiled pSConv kernel, into ~/.cache/leancnn (a minute the first time; without a
# compiler leancnn says so and uses the masked dense convolution).
kernels: $(STAMP)
	@$(PY) -m leancnn.kernels

demo: setup
	$(VENV)/bin/leancnn bench --quick --out bench/quick

test: setup
	$(VENV)/bin/lint-imports --no-cache
	@# One process per core (each test runs on one torch thread), at most 4 (a worker holds torch).
	$(PY) -m pytest -q -n auto --maxprocesses 4

clean-runs:
	rm -rf runs bench
