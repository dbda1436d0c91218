# Set-up and everyday commands. Everything installs into ./.venv from pyproject.toml, at the versions
# pinned in requirements/constraints.txt (`make lock` refreshes them from a venv the tests passed in).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= .llava
LOCK := requirements/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed picks its accelerator at import time; these machines have none, GPU images unset this.
export DS_ACCELERATOR ?= cpu
# OpenMP threads that spin while waiting collapse on a busy 2-core box (Ray workers, a driver and a
# server share it): measured 5 s vs 0.05 s per tiny-LM step under load. Passive waiting costs little.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test install install-dev lint lock bench-train bench-serve clean

# -c: the lock pins the version of everything installed, while a dependency not in it yet still installs.
$(BIN)/llavactl: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c $(LOCK) -e .
	touch $@

$(VENV)/.dev: $(BIN)/llavactl
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	touch $@

install: $(BIN)/llavactl
install-dev: $(VENV)/.dev

# The main job end to end on the embedded default (local Ray, sqlite MLflow, files under $(WORKDIR)).
run: install
	$(BIN)/llavactl run --workdir $(WORKDIR)

test: install-dev
	bash tools/install_helm.sh
	bash tools/install_chromium.sh
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(BIN)/python -m pytest

# Re-pin requirements/constraints.txt to what is installed now: run it after `make test` passed.
lock: install-dev
	$(BIN)/python tools/lock_constraints.py

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench-train: install-dev
	$(BIN)/python benchmarks/train_throughput.py

bench-serve: install-dev
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) $(WORKDIR) .tools
