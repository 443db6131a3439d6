# Two entry points for a fresh machine (see README.md): `make run` and `make test`.
# Both create .venv and install the pinned set first; reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test repro install labelstudio browser postgres bench-deps

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(BIN)/python -c "import tidal, flows, prefect, mlflow, dvc, pytest"
	touch $@

install: $(BIN)/.installed

# Label Studio for tests/integration/test_labelstudio.py, in a virtualenv of its own: its Django
# stack is not ours, so it stays out of pyproject.toml's pins (~130 s to install, once).
LABEL_STUDIO := label-studio==1.23.2
LS_VENV := .venv-labelstudio
$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q "$(LABEL_STUDIO)" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(LS_VENV)/bin/label-studio --help > /dev/null
	touch $@

labelstudio: $(LS_VENV)/.installed

# Headless Chromium for tests/integration/test_ui.py: Debian's package through apt (a browser
# download at run time does not work here); as root, or through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium > /dev/null || $(SUDO) apt-get install -y -o DPkg::Lock::Timeout=600 --no-install-recommends chromium \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get install -y -o DPkg::Lock::Timeout=600 --no-install-recommends chromium; }
	@chromium --version

# PostgreSQL for `tidal stack` and tests/integration/test_stack.py: Debian's package through apt,
# as for the browser. The stack runs its own cluster; the package's default cluster is not needed.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 || $(SUDO) apt-get install -y -o DPkg::Lock::Timeout=600 --no-install-recommends postgresql \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get install -y -o DPkg::Lock::Timeout=600 --no-install-recommends postgresql; }
	@ls /usr/lib/postgresql/*/bin/initdb

# The main job: a TiDAL experiment on the embedded digits data, tracked in ./mlflow.db. One torch
# thread: CPU training is bit-for-bit repeatable only at a fixed thread count, and torch's default
# (one per core) differs between machines; README's table is this command's output.
run: install
	OMP_NUM_THREADS=1 $(BIN)/tidal run

# The whole test suite (CI runs exactly this through .ci/run): the four installs side by side,
# then pytest on 2 workers, a test file to one worker (the integration tests spend much of their
# time waiting on the servers they start), the longest files first (tests/conftest.py).
test:
	$(MAKE) -j4 install labelstudio browser postgres
	$(MAKE) bench-deps
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# Rerun the experiment through DVC: write the pinned data if missing, then reproduce.
repro: install
	$(BIN)/tidal data
	$(BIN)/dvc repro

# benchmarks/vs_baal.py: the `bench` extra's pins from pyproject.toml, installed with --no-deps
# (baal 2.1.0 declares jupyter, which it does not need; see the comment there).
# make test installs them too: tests/code/test_vs_baal.py runs one tiny cycle of baal beside ours.
bench-deps: $(BIN)/.bench-installed
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench'])" \
		| xargs $(BIN)/pip install -q --no-deps 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(BIN)/python -c "import baal.active, baal.modelwrapper"
	touch $@
