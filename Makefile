# Two commands do all set-up: `make reproduce` and `make test` (see README.md).
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= smoke
ONLY    ?=
KERNEL  := paper-lib
# The CPU build of torch where no NVIDIA driver is present (a plain `torch` pulls
# gigabytes of CUDA wheels); override e.g. `make TORCH_SPEC=torch==2.5.1 test`.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
# Extra pip arguments for the torch install, e.g. a CPU-only wheel index on a laptop.
TORCH_PIP_ARGS ?=
# The venv is reinstalled when the dependency list or this file changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: venv reproduce test unit nbval lab lint bench scoreboard determinism clean

venv: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,browser]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (paper_lib)" >/dev/null
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "venv ready: $$(du -sh $(VENV) | cut -f1)"

reproduce: $(STAMP)
	$(PY) -m paper_lib.reproduce --profile $(PROFILE) $(if $(ONLY),--only $(ONLY))

# Unit tests first: they read the committed results (README scoreboard check)
# before nbval re-executes the notebooks and rewrites them.
test: $(STAMP)
	$(PY) -m pytest tests -q
	$(PY) -m pytest -q --nbval-lax --nbval-kernel-name $(KERNEL) --nbval-cell-timeout 900 notebooks

unit: $(STAMP)
	$(PY) -m pytest tests -q

nbval: $(STAMP)
	$(PY) -m pytest -q --nbval-lax --nbval-kernel-name $(KERNEL) --nbval-cell-timeout 900 notebooks

determinism: $(STAMP)
	$(PY) -m paper_lib.reproduce --profile smoke --check-determinism $(if $(ONLY),--only $(ONLY))

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

lint: $(STAMP)
	$(VENV)/bin/ruff check paper_lib tests

bench: $(STAMP)
	$(PY) -m paper_lib.bench

scoreboard: $(STAMP)
	$(PY) -m paper_lib.claims --update-readme

clean:
	rm -rf build .pytest_cache
