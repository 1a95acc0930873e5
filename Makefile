# Two commands do all the set-up: `make demo` and `make test`.
# The virtual environment lives outside the clone, keyed by a hash of the dependency
# files, so a second clone, CI and reruns reuse it instead of reinstalling ~6 GB.
PYTHON ?= python3.11
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/featcache/venv-$(DEPS_HASH)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: demo test venv install clean-venv help

help:
	@echo "make demo   set up the environment (first time only) and run featcache demo"
	@echo "make test   set up the environment (first time only) and run the test suite"

# No file prerequisites: the hash in VENV's name already changes with the dependency files
# (a fresh clone's newer mtimes must not trigger a reinstall).
$(STAMP):
	@echo "Creating $(VENV) (first time only; installs torch, jax, ... ~6 GB)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The venv is shared between clones: point its editable install at this clone (fast, no deps).
install: $(STAMP)
	@$(PY) -c "import featcache, pathlib, sys; sys.exit(pathlib.Path(featcache.__file__).resolve().parent != pathlib.Path('featcache').resolve())" 2>/dev/null \
		|| $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

demo: install
	$(VENV)/bin/featcache demo

test: install
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
