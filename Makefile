# Two commands do all set-up: `make reproduce` and `make test` (see README.md).
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= smoke
ONLY    ?=
# Notebooks at a time (0: 2 for smoke on 2+ cores, else 1); see paper_lib/reproduce.py.
JOBS    ?= 0
# The CPU build of torch where no NVIDIA driver is present (a plain `torch` pulls
# gigabytes of CUDA wheels); override e.g. `make TORCH_SPEC=torch==2.5.1 test`.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
# Extra pip arguments for the torch install, e.g. a CPU-only wheel index on a laptop.
TORCH_PIP_ARGS ?=
# The venv is reinstalled when the dependency list or this file changes. STAMP: what the
# notebooks need (reproduce, lab); DEV_STAMP adds the test tools (pytest, nbval, SAELens,
# Playwright), installed by the first target that needs them. cksum: POSIX, so also on
# macOS, which has no sha1sum.
HASH := $(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(HASH)
DEV_STAMP := $(VENV)/.installed-dev-$(HASH)

.PHONY: venv reproduce test unit nbval browser-deps browser-test lab lint bench scoreboard \
	determinism device-wheels clean

venv: $(DEV_STAMP)

# --no-compile: pip would byte-compile every installed module up front (a third of the
# install's time); the kernelspec step compiles just the modules the project imports
# (needed where PYTHONDONTWRITEBYTECODE is set: no process would ever cache them).
# The venv's Python must be 3.10 or newer (pyproject.toml): say so before creating it, not
# in pip's words after (macOS's own python3 is 3.9).
$(STAMP):
	@test -x $(PY) || { \
	  if ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then \
	    echo "make: PYTHON=$(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo 'not found');" \
	      "paper_lib needs Python 3.10 or newer: name one, e.g." \
	      "make PYTHON=python3.12 $(MAKECMDGOALS)" >&2; exit 1; fi; \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --no-compile $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-compile -e .
	$(PY) -m paper_lib.kernelspec
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "venv ready: $$(du -sh $(VENV) | cut -f1)"

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-compile -e ".[dev,browser]"
	$(PY) -m paper_lib.kernelspec --precompile-only
	@touch $@
	@echo "test tools ready: $$(du -sh $(VENV) | cut -f1)"

reproduce: $(STAMP)
	$(PY) -m paper_lib.reproduce --profile $(PROFILE) --jobs $(JOBS) $(if $(ONLY),--only $(ONLY))

# The unit tests and nbval run side by side: the unit tests keep about one core busy
# (261 CPU-s in 251 s here), nbval's prepare step (the LM and activations the notebooks
# share) and notebooks fill the rest, two at a time. Run one after the other they left
# ~280 CPU-s of a 2-core machine idle. Neither writes what the other reads: nbval's records
# and figures go to build/nbval, the unit tests' runs to temporary folders. Both with
# OpenMP's waiting threads asleep (spinning waiters of two processes on 2 cores made a
# fresh clone's unit tests 404 s beside the LM against 241 s with them asleep). The unit
# tests' output goes to build/unit.log, printed when both are done; the browser test needs
# the data nbval's runs leave behind, so it comes last.
test: $(DEV_STAMP)
	@mkdir -p build
	@export OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}; \
	echo "$(PY) -m pytest tests -q --ignore=tests/browser  (beside nbval; output: build/unit.log)"; \
	$(PY) -m pytest tests -q --ignore=tests/browser > build/unit.log 2>&1 & unit=$$!; \
	trap 'kill $$unit 2>/dev/null; exit 130' INT TERM; \
	$(PY) -m paper_lib.reproduce --nbval --jobs $(JOBS); nbval=$$?; \
	wait $$unit; unit=$$?; \
	echo "--- unit tests (build/unit.log) ---"; cat build/unit.log; \
	[ $$unit = 0 ] || echo "unit tests FAILED (exit $$unit)"; \
	[ $$nbval = 0 ] || echo "nbval FAILED (exit $$nbval)"; \
	[ $$unit = 0 ] && [ $$nbval = 0 ]
	$(MAKE) --no-print-directory browser-test

unit: $(DEV_STAMP)
	$(PY) -m pytest tests -q --ignore=tests/browser

# Debian's chromium for the real-browser test (installed only when running as root).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	      >/dev/null 2>&1 || echo "could not install chromium: the browser test will skip"; \
	  else echo "chromium missing and not root: the browser test will skip"; fi; }

browser-test: $(DEV_STAMP) browser-deps
	$(PY) -m pytest tests/browser -q -rs

nbval: $(DEV_STAMP)
	$(PY) -m paper_lib.reproduce --nbval --jobs $(JOBS) $(if $(ONLY),--only $(ONLY))

determinism: $(STAMP)
	$(PY) -m paper_lib.reproduce --profile smoke --check-determinism $(if $(ONLY),--only $(ONLY))

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check paper_lib tests

bench: $(STAMP)
	$(PY) -m paper_lib.bench

# Wheels the GPU machine's image lacks, for .ci/gpu_session.sh (see README, GPU runs).
device-wheels: $(STAMP)
	$(PY) .ci/device_wheels.py

scoreboard: $(STAMP)
	$(PY) -m paper_lib.claims --update-readme

clean:
	rm -rf build .pytest_cache
